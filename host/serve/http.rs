//! The HTTP side: routes, request preparation, JSON and server-sent-event responses, the admin
//! policy routes, and the accept loop with graceful drain on SIGTERM.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::tls::HANDSHAKE_TIMEOUT;
use tokio::sync::mpsc::{self, UnboundedReceiver};

use super::api::{self, Endpoint, ParsedRequest, PromptInput, SpeculationChoice};
use super::auth::Tokens;
use super::background;
use super::batch;
use super::chat_store;
use super::conversations;
use super::error::ApiError;
use super::generate::{Event, Job, Outcome};
use super::logprobs::{self, TokenEntry};
use super::message_batch;
use super::messages;
use super::metrics::Metrics;
use super::pool::Pool;
use super::reasoning;
use super::responses;
use super::tools;
use crate::decide::PolicyRegistry;
use crate::engine::{self, Engine, GenerateRequest};
use crate::models::chat::{ChatTemplate, Message};
use crate::models::embed::Pooling;
use crate::models::tokenizer::Tokenizer;
use crate::sample::{self, Grammars, SamplingParams};

type Body = BoxBody<Bytes, Infallible>;

/// A request's body: a connection's, or a batch line's ([`dispatch`]).
type Incoming = UnsyncBoxBody<Bytes, hyper::Error>;

/// How `verdict serve` runs (the CLI fills it).
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub host: String,
    /// 0 picks a free port; the chosen address is printed as `listening on http://ADDR`
    /// (`https://` with `tls`).
    pub port: u16,
    /// HTTPS instead of HTTP (`--ssl-certfile`...).
    pub tls: Option<super::tls::Tls>,
    /// Read the TLS files again when they change (`--enable-ssl-refresh`).
    pub tls_refresh: bool,
    /// Sampling fields set on requests that leave them out (`--override-generation-config`,
    /// [`api::generation_defaults`]).
    pub generation_defaults: serde_json::Map<String, Value>,
    /// Logprobs name tokens `token_id:N` in every completions and chat response.
    pub tokens_as_ids: bool,
    /// Every streamed completions and chat response ends with a usage chunk.
    pub force_include_usage: bool,
    /// Generation worker threads (requests generating at once).
    pub workers: usize,
    /// Requests that may wait for a worker; more get 429.
    pub max_queue: usize,
    /// The bearer token the policy admin routes (PUT, DELETE) require.
    pub admin_token: Option<Tokens>,
    /// The API keys every route but `/health`, `/ready` and `/metrics` requires (OpenAI's
    /// `Authorization: Bearer <key>`); `None`: those routes are open.
    pub api_keys: Option<Tokens>,
    /// The id `/v1/models` lists and requests name in `model`.
    pub model_id: String,
    /// More names of the same model (vLLM's further `--served-model-name`s): listed and
    /// accepted in `model`; responses name `model_id`.
    pub model_aliases: Vec<String>,
    /// The policy a request gets when it names none.
    pub default_policy: String,
    /// How long SIGTERM waits for in-flight requests.
    pub drain_timeout: Duration,
    pub max_body_bytes: usize,
    pub max_policy_bytes: usize,
    /// Where uploaded files and batches are kept across restarts (`--batch-dir`); `None`: in
    /// memory.
    pub batch_dir: Option<std::path::PathBuf>,
    /// Where conversations are kept across restarts (`--conversation-dir`); `None`: in memory.
    pub conversation_dir: Option<std::path::PathBuf>,
    /// The largest upload `POST /v1/files` takes.
    pub max_file_bytes: usize,
    /// The bytes of all stored files (uploads and batch outputs) beyond which uploads are
    /// refused.
    pub file_store_bytes: usize,
    /// Chat replies' thinking goes to `reasoning_content` (vLLM's `--reasoning-parser`).
    pub reasoning: Option<reasoning::Parser>,
    /// How `/v1/embeddings` pools a text's hidden states; `None`: as the GGUF declares
    /// (`pooling_type`), else the last token's.
    pub pooling: Option<Pooling>,
    /// The LoRA modules a request may name in `model` (vLLM's `--lora-modules`): name and
    /// adapter path, listed by `/v1/models` while the model loads; then [`Served::modules`].
    pub lora_modules: Vec<(String, std::path::PathBuf)>,
    /// `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` may change the modules (they
    /// read adapter files the server can reach, so they are off unless asked for; the admin
    /// token guards them when one is set).
    pub allow_lora_loading: bool,
    /// With `priority`, waiting requests start in the order of their `priority` field (lower
    /// first); with `fcfs` in arrival order, and a request may not set one.
    pub scheduling: Scheduling,
    /// Web pages (origins, or `*` for any) whose scripts may call the server: CORS headers
    /// and preflight answers for them. Empty: no CORS, browsers keep pages from calling.
    pub allowed_origins: Vec<String>,
}

/// vLLM's `--scheduling-policy`: the order in which waiting requests get a worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Scheduling {
    /// First come, first served.
    #[default]
    Fcfs,
    /// By each request's `priority` (lower first), then arrival.
    Priority,
}

impl ServeOptions {
    pub fn new(model_id: impl Into<String>) -> Self {
        ServeOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            tls: None,
            tls_refresh: false,
            generation_defaults: serde_json::Map::new(),
            tokens_as_ids: false,
            force_include_usage: false,
            workers: 2,
            max_queue: 64,
            admin_token: None,
            api_keys: None,
            model_id: model_id.into(),
            model_aliases: Vec::new(),
            default_policy: "strict".into(),
            drain_timeout: Duration::from_secs(60),
            max_body_bytes: 8 << 20,
            max_policy_bytes: 64 << 20,
            batch_dir: None,
            conversation_dir: None,
            max_file_bytes: 100 << 20,
            file_store_bytes: 1 << 30,
            reasoning: None,
            pooling: None,
            lora_modules: Vec::new(),
            allow_lora_loading: false,
            scheduling: Scheduling::Fcfs,
            allowed_origins: Vec::new(),
        }
    }
}

/// What the server generates with: the engine, and the target's tokenizer and chat template
/// (text in, text out; the engine works on token ids).
pub struct Served {
    pub engine: Engine,
    /// The LoRA modules requests may name: each an engine whose target has that adapter (its
    /// weights shared with `engine`'s), the same draft and policies. Loaded at start
    /// ([`ServeOptions::lora_modules`]) and, when allowed, while the server runs.
    pub modules: std::sync::RwLock<Vec<Module>>,
    /// Builds a module's engine from an adapter (the base target, with the start's `--lora`
    /// adapters too); `None` where the server cannot adapt its target.
    pub adapt: Option<Adapt>,
    pub tokenizer: Arc<Tokenizer>,
    pub chat: Arc<ChatTemplate>,
}

/// A LoRA module: the name requests use, the adapter's path, its engine.
#[derive(Clone)]
pub struct Module {
    pub name: String,
    pub root: std::path::PathBuf,
    pub engine: Engine,
}

/// See [`Served::adapt`].
pub type Adapt =
    Box<dyn Fn(&crate::models::LoraAdapter) -> anyhow::Result<Engine> + Send + Sync + 'static>;

/// Loads the engine (models, tokenizer, drafter) after the port is bound, so `/health` answers
/// while weights load and `/ready` says when they have.
pub type Loader = Box<dyn FnOnce() -> anyhow::Result<Served> + Send + 'static>;

struct App {
    opts: ServeOptions,
    served: OnceLock<Arc<Served>>,
    /// The tokenizer's token trie for structured outputs, built when the model has loaded (an
    /// error if this tokenizer cannot end a grammar).
    grammars: OnceLock<Result<Grammars, String>>,
    registry: Arc<PolicyRegistry>,
    pool: Pool,
    metrics: Arc<Metrics>,
    /// Responses API replies kept for `previous_response_id` (bounded, in memory).
    responses: Mutex<responses::Store>,
    /// Chat completions kept with `store: true` (bounded, in memory).
    chats: Mutex<chat_store::Store>,
    /// Conversations (`/v1/conversations`; bounded, in memory), shared with their leases.
    conversations: Arc<Mutex<conversations::Store>>,
    /// Background responses running, and the last ended.
    runs: Mutex<background::Runs>,
    /// Uploaded files and batches (`/v1/files`, `/v1/batches`; in memory).
    batches: Mutex<batch::Store>,
    /// Batch lines running, across batches: at most one generation per worker.
    batch_gate: batch::Gate,
    /// Batches to run, to the task that runs them (a batch's lines go through [`route`], which
    /// starts batches: a channel, not a call, keeps the futures' types apart).
    batch_tx: mpsc::UnboundedSender<batch::Resume>,
    /// Where files and batches outlive the server (`--batch-dir`).
    disk: Option<batch::Disk>,
    draining: AtomicBool,
    created: u64,
    next_id: AtomicU64,
}

impl App {
    fn new(opts: ServeOptions, registry: Arc<PolicyRegistry>) -> anyhow::Result<Arc<App>> {
        let metrics = Arc::new(Metrics::for_model(&opts.model_id));
        let pool = Pool::new(opts.workers, opts.max_queue, metrics.clone())
            .context("cannot start the generation workers")?;
        let (batch_tx, mut batches) = mpsc::unbounded_channel();
        let disk = (opts.batch_dir.as_deref())
            .map(batch::Disk::open)
            .transpose()
            .context("--batch-dir")?;
        let (store, resumes) = match &disk {
            Some(d) => {
                let (files, batches, resumes) = d.load();
                if !files.is_empty() || !batches.is_empty() {
                    tracing::info!(
                        "--batch-dir: {} files and {} batches kept, {} going on",
                        files.len(),
                        batches.len(),
                        resumes.len()
                    );
                }
                (batch::Store::with(files, batches), resumes)
            }
            None => (batch::Store::default(), Vec::new()),
        };
        for r in resumes {
            let _ = batch_tx.send(r);
        }
        let conversations = match &opts.conversation_dir {
            Some(d) => conversations::Store::on_disk(d).context("--conversation-dir")?,
            None => conversations::Store::default(),
        };
        let app = Arc::new(App {
            batch_tx,
            disk,
            batch_gate: batch::Gate::new(opts.workers),
            opts,
            served: OnceLock::new(),
            grammars: OnceLock::new(),
            registry,
            pool,
            metrics,
            responses: Mutex::default(),
            chats: Mutex::default(),
            conversations: Arc::new(Mutex::new(conversations)),
            runs: Mutex::default(),
            batches: Mutex::new(store),
            draining: AtomicBool::new(false),
            created: unix_now(),
            next_id: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&app);
        tokio::spawn(async move {
            while let Some((b, lines, answered)) = batches.recv().await {
                if let Some(app) = weak.upgrade() {
                    tokio::spawn(run_batch(app, b, lines, answered));
                }
            }
        });
        Ok(app)
    }

    /// The engine is loaded: requests may run.
    fn loaded(&self, served: Served) {
        // The token trie of structured outputs, built now rather than by the first request
        // that asks for a grammar (0.4 s for Qwen's vocabulary).
        let t1 = Instant::now();
        let g = self
            .grammars
            .get_or_init(|| Grammars::new(&served.tokenizer).map_err(|e| format!("{e:#}")));
        match g {
            Ok(_) => tracing::info!(
                "grammar token trie built in {:.2} s",
                t1.elapsed().as_secs_f64()
            ),
            Err(e) => tracing::warn!("structured outputs are off for this model: {e}"),
        }
        let _ = self.served.set(Arc::new(served));
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs the server until SIGTERM / SIGINT (then drains) or until the engine fails to load.
pub fn run(
    opts: ServeOptions,
    registry: Arc<PolicyRegistry>,
    loader: Loader,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("verdict-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(opts, registry, loader))
}

async fn serve(
    opts: ServeOptions,
    registry: Arc<PolicyRegistry>,
    loader: Loader,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
    let addr = listener.local_addr().context("no local address")?;
    if !addr.ip().is_loopback() {
        if opts.api_keys.is_none() {
            tracing::warn!(
                "listening on {addr} without an API key (--api-key-file or VERDICT_API_KEY): anyone who reaches it can generate"
            );
        }
        if opts.admin_token.is_none() && opts.api_keys.is_none() {
            tracing::warn!(
                "listening on {addr} without --admin-token-file: anyone who reaches it can replace policies"
            );
        }
    }
    let app = App::new(opts, registry)?;
    // Tests and scripts read this line to find the port.
    let scheme = if app.opts.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("verdict: listening on {scheme}://{addr}");
    if let Some(tls) = app.opts.tls.clone().filter(|_| app.opts.tls_refresh) {
        tokio::spawn(tls.refresh(super::tls::REFRESH_EVERY));
    }
    {
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }

    let (load_tx, mut load_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    {
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            match loader() {
                Ok(served) => {
                    app.loaded(served);
                    tracing::info!("model loaded in {:.1} s; ready", t0.elapsed().as_secs_f64());
                    eprintln!("verdict: ready ({:.1} s)", t0.elapsed().as_secs_f64());
                }
                Err(e) => {
                    let _ = load_tx.send(e);
                }
            }
        });
    }

    let mut terminate = shutdown_signal()?;
    let graceful = GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let builder = Arc::new(builder);
    // Dropped when the server stops taking connections: handshakes still under way end.
    let (stop_handshakes, stopping) = tokio::sync::watch::channel(());
    let mut loading = true;
    let load_error = loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (builder, watcher) = (builder.clone(), graceful.watcher());
                tokio::spawn(connection(app.clone(), stream, peer, builder, watcher, stopping.clone()));
            }
            e = &mut load_rx, if loading => {
                match e {
                    Ok(e) => break Some(e),
                    // The loader finished without error: keep serving, and stop polling the
                    // closed channel (it would answer at once, every time: a busy loop).
                    Err(_) => loading = false,
                }
            }
            _ = terminate.recv() => break None,
        }
    };
    drop(listener);
    drop(stop_handshakes);
    app.draining.store(true, Ordering::SeqCst);
    if let Some(e) = load_error {
        return Err(e.context("cannot load the model"));
    }
    eprintln!(
        "verdict: draining ({} running, {} queued)",
        app.pool.busy(),
        app.pool.queued()
    );
    let drain_timeout = app.opts.drain_timeout;
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain_timeout) => {
            eprintln!("verdict: drain timed out after {} s; exiting", drain_timeout.as_secs());
        }
        _ = terminate.recv() => eprintln!("verdict: second signal; exiting now"),
    }
    let app2 = app.clone();
    let drained = tokio::task::spawn_blocking(move || app2.pool.drain(Duration::from_secs(5)))
        .await
        .unwrap_or(false);
    eprintln!(
        "verdict: stopped{}",
        if drained { "" } else { " (workers still busy)" }
    );
    Ok(())
}

/// A connection's byte stream: plain TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// One accepted connection, in a task of its own: the TLS handshake when serving HTTPS (here,
/// so a slow client holds up no other; cut short when the server stops), then HTTP/1.1 or
/// HTTP/2 until it closes, watched by the graceful shutdown.
async fn connection(
    app: Arc<App>,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    builder: Arc<hyper_util::server::conn::auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    mut stopping: tokio::sync::watch::Receiver<()>,
) {
    let io: Box<dyn Io> = match app.opts.tls.as_ref().map(super::tls::Tls::acceptor) {
        None => Box::new(stream),
        Some(acceptor) => {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => Box::new(s),
                    Ok(Err(e)) => {
                        tracing::debug!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("TLS handshake with {peer} timed out");
                        return;
                    }
                },
                _ = stopping.changed() => return,
            }
        }
    };
    let service = hyper::service::service_fn(move |req| handle(app.clone(), peer, req));
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!("connection from {peer}: {e}");
    }
}

/// SIGTERM or SIGINT, as a stream (a second one forces the exit).
fn shutdown_signal() -> anyhow::Result<mpsc::UnboundedReceiver<()>> {
    let (tx, rx) = mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

async fn handle(
    app: Arc<App>,
    _peer: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let arrived = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // A client's request id comes back on the response (as vLLM's servers send it), so that
    // it can match replies and logs through proxies.
    let request_id = req.headers().get("x-request-id").cloned();
    let origin = allowed_origin(&app.opts.allowed_origins, &req);
    // A browser's preflight carries no credentials: answered before the key check.
    if method == Method::OPTIONS
        && let Some(origin) = &origin
        && req.headers().contains_key("access-control-request-method")
    {
        let mut r = Response::new(BodyExt::boxed(Full::new(Bytes::new())));
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        cors_headers(h, origin);
        h.insert(
            "access-control-allow-methods",
            HeaderValue::from_static("GET, POST, PUT, DELETE, OPTIONS"),
        );
        let asked = req.headers().get("access-control-request-headers").cloned();
        h.insert(
            "access-control-allow-headers",
            asked.unwrap_or(HeaderValue::from_static(
                "authorization, content-type, x-api-key, x-request-id",
            )),
        );
        h.insert("access-control-max-age", HeaderValue::from_static("600"));
        h.insert(
            header::VARY,
            HeaderValue::from_static("Origin, Access-Control-Request-Headers"),
        );
        app.metrics.request("preflight", 204);
        return Ok(r);
    }
    let (route, result) = match check_api_key(&app, &method, &path, &req) {
        Ok(()) => route(&app, method.clone(), &path, req.map(BodyExt::boxed_unsync)).await,
        Err(e) => ("unauthorized", Err(e)),
    };
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_server_error() {
                tracing::error!("{route}: {e}");
            } else {
                tracing::debug!("{route}: {e}");
            }
            // Anthropic's clients read errors in their API's shape.
            let body = if path.starts_with("/v1/messages") {
                messages::error_body(&e)
            } else {
                e.body()
            };
            error_response(&e, &body)
        }
    };
    let mut resp = resp;
    if let Some(id) = request_id {
        resp.headers_mut().insert("x-request-id", id);
    }
    if let Some(origin) = &origin {
        cors_headers(resp.headers_mut(), origin);
    }
    // Answers differ by origin whenever CORS is on: caches must keep them apart.
    if !app.opts.allowed_origins.is_empty() {
        resp.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    if !OPEN_ROUTES.contains(&route) {
        let id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(|v| format!(" (x-request-id {v})"))
            .unwrap_or_default();
        tracing::info!(
            target: "verdict::requests",
            "{method} {path} {} in {:.1} ms{id}",
            resp.status().as_u16(),
            arrived.elapsed().as_secs_f64() * 1e3
        );
    }
    app.metrics.request(route, resp.status().as_u16());
    Ok(resp)
}

/// The probes, metrics and version: open without an API key, and not logged per request
/// (they come every few seconds).
const OPEN_ROUTES: &[&str] = &["/health", "/ready", "/metrics", "/version", "/ping"];

/// The request's `Origin` when `allowed` lets it call (`*`: any), as the value to send back.
fn allowed_origin<B>(allowed: &[String], req: &Request<B>) -> Option<HeaderValue> {
    let origin = req.headers().get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/') == text)
        .then(|| origin.clone())
}

/// CORS headers for an allowed origin (echoed, so that caches keep answers per origin).
fn cors_headers(h: &mut hyper::HeaderMap, origin: &HeaderValue) {
    h.insert("access-control-allow-origin", origin.clone());
    h.insert(
        "access-control-expose-headers",
        HeaderValue::from_static("x-request-id, retry-after"),
    );
}

async fn route(
    app: &Arc<App>,
    method: Method,
    path: &str,
    req: Request<Incoming>,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let allow = |allowed: &str| {
        Err(ApiError::method_not_allowed(format!(
            "{method} is not allowed on {path} (allowed: {allowed})"
        )))
    };
    match path {
        "/health" => (
            "/health",
            match method {
                Method::GET | Method::HEAD => {
                    Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
                }
                _ => allow("GET"),
            },
        ),
        "/ready" => (
            "/ready",
            match method {
                Method::GET | Method::HEAD => Ok(ready(app)),
                _ => allow("GET"),
            },
        ),
        "/metrics" => (
            "/metrics",
            match method {
                Method::GET => Ok(metrics(app)),
                _ => allow("GET"),
            },
        ),
        "/version" => (
            "/version",
            match method {
                Method::GET => Ok(json_response(
                    StatusCode::OK,
                    &json!({"version": env!("CARGO_PKG_VERSION")}),
                )),
                _ => allow("GET"),
            },
        ),
        // SageMaker's health check and inference route (as vLLM serves them).
        "/ping" => (
            "/ping",
            match method {
                Method::GET | Method::POST | Method::HEAD => Ok(ready(app)),
                _ => allow("GET, POST"),
            },
        ),
        "/invocations" => (
            "/invocations",
            match method {
                Method::POST => invocation(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/models" => (
            "/v1/models",
            match method {
                Method::GET => Ok(models(app)),
                _ => allow("GET"),
            },
        ),
        "/v1/completions" => (
            "/v1/completions",
            match method {
                Method::POST => completion(app, Endpoint::Completions, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/chat/completions" => (
            "/v1/chat/completions",
            match method {
                Method::POST => completion(app, Endpoint::Chat, req).await,
                Method::GET => chat_store::parse_query(req.uri().query(), true, percent_decode)
                    .and_then(|q| lock(&app.chats).list(&q))
                    .map(|v| json_response(StatusCode::OK, &v)),
                _ => allow("GET, POST"),
            },
        ),
        p if p.starts_with("/v1/chat/completions/") => {
            stored_chat_route(app, method, &p["/v1/chat/completions/".len()..], req).await
        }
        "/v1/responses" => (
            "/v1/responses",
            match method {
                Method::POST => create_response(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/messages" => (
            "/v1/messages",
            match method {
                Method::POST => create_message(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/messages/batches" => (
            "/v1/messages/batches",
            match method {
                Method::POST => create_message_batch(app, req).await,
                Method::GET => list_message_batches(app, &req),
                _ => allow("GET, POST"),
            },
        ),
        p if p.starts_with("/v1/messages/batches/") => {
            let rest = &p["/v1/messages/batches/".len()..];
            if let Some(id) = rest.strip_suffix("/cancel") {
                (
                    "/v1/messages/batches/{id}/cancel",
                    match method {
                        Method::POST => cancel_message_batch(app, &percent_decode(id), &req),
                        _ => allow("POST"),
                    },
                )
            } else if let Some(id) = rest.strip_suffix("/results") {
                (
                    "/v1/messages/batches/{id}/results",
                    match method {
                        Method::GET => message_batch_results(app, &percent_decode(id)),
                        _ => allow("GET"),
                    },
                )
            } else {
                (
                    "/v1/messages/batches/{id}",
                    match method {
                        Method::GET => get_message_batch(app, &percent_decode(rest), &req),
                        Method::DELETE => delete_message_batch(app, &percent_decode(rest)),
                        _ => allow("GET, DELETE"),
                    },
                )
            }
        }
        "/v1/messages/count_tokens" => (
            "/v1/messages/count_tokens",
            match method {
                Method::POST => count_message_tokens(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/responses/input_tokens" => (
            "/v1/responses/input_tokens",
            match method {
                Method::POST => count_response_tokens(app, req).await,
                _ => allow("POST"),
            },
        ),
        p if p.starts_with("/v1/responses/") => {
            let rest = &p["/v1/responses/".len()..];
            if let Some(id) = rest.strip_suffix("/input_items") {
                return (
                    "/v1/responses/{id}/input_items",
                    match method {
                        Method::GET => {
                            response_input_items(app, &percent_decode(id), req.uri().query())
                        }
                        _ => allow("GET"),
                    },
                );
            }
            match rest.strip_suffix("/cancel") {
                Some(id) => (
                    "/v1/responses/{id}/cancel",
                    match method {
                        Method::POST => cancel_response(app, &percent_decode(id)),
                        _ => allow("POST"),
                    },
                ),
                None => {
                    let id = percent_decode(rest);
                    (
                        "/v1/responses/{id}",
                        match method {
                            Method::GET => stored_response(app, &id, req.uri().query()),
                            Method::DELETE => delete_response(app, &id),
                            _ => allow("GET, DELETE"),
                        },
                    )
                }
            }
        }
        "/v1/conversations" => (
            "/v1/conversations",
            match method {
                Method::POST => create_conversation(app, req).await,
                _ => allow("POST"),
            },
        ),
        p if p.starts_with("/v1/conversations/") => {
            conversation_route(app, method, &p["/v1/conversations/".len()..], req).await
        }
        "/v1/embeddings" => (
            "/v1/embeddings",
            match method {
                Method::POST => embeddings(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/rerank" | "/rerank" | "/v2/rerank" => (
            "/v1/rerank",
            match method {
                Method::POST => rerank(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/score" | "/score" => (
            "/v1/score",
            match method {
                Method::POST => score(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/files" => (
            "/v1/files",
            match method {
                Method::POST => upload_file(app, req).await,
                Method::GET => list(app, req.uri().query(), true),
                _ => allow("GET, POST"),
            },
        ),
        p if p.starts_with("/v1/files/") => {
            let rest = &p["/v1/files/".len()..];
            match rest.strip_suffix("/content") {
                Some(id) => (
                    "/v1/files/{id}/content",
                    match method {
                        Method::GET => file_content(app, &percent_decode(id)),
                        _ => allow("GET"),
                    },
                ),
                None => (
                    "/v1/files/{id}",
                    match method {
                        Method::GET => file_object(app, &percent_decode(rest)),
                        Method::DELETE => delete_file(app, &percent_decode(rest)),
                        _ => allow("GET, DELETE"),
                    },
                ),
            }
        }
        "/v1/batches" => (
            "/v1/batches",
            match method {
                Method::POST => create_batch(app, req).await,
                Method::GET => list(app, req.uri().query(), false),
                _ => allow("GET, POST"),
            },
        ),
        p if p.starts_with("/v1/batches/") => {
            let rest = &p["/v1/batches/".len()..];
            match rest.strip_suffix("/cancel") {
                Some(id) => (
                    "/v1/batches/{id}/cancel",
                    match method {
                        Method::POST => cancel_batch(app, &percent_decode(id)),
                        _ => allow("POST"),
                    },
                ),
                None => (
                    "/v1/batches/{id}",
                    match method {
                        Method::GET => get_batch(app, &percent_decode(rest)),
                        _ => allow("GET"),
                    },
                ),
            }
        }
        "/tokenize" => (
            "/tokenize",
            match method {
                Method::POST => tokenize(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/detokenize" => (
            "/detokenize",
            match method {
                Method::POST => detokenize(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/load_lora_adapter" => (
            "/v1/load_lora_adapter",
            match method {
                Method::POST => load_lora_adapter(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/unload_lora_adapter" => (
            "/v1/unload_lora_adapter",
            match method {
                Method::POST => unload_lora_adapter(app, req).await,
                _ => allow("POST"),
            },
        ),
        "/v1/policies" => (
            "/v1/policies",
            match method {
                Method::GET => list_policies(app).await,
                _ => allow("GET"),
            },
        ),
        p if p.starts_with("/v1/models/") => (
            "/v1/models/{id}",
            match method {
                Method::GET => model(app, &percent_decode(&p["/v1/models/".len()..])),
                _ => allow("GET"),
            },
        ),
        p if p.starts_with("/v1/policies/") => {
            let name = percent_decode(&p["/v1/policies/".len()..]);
            (
                "/v1/policies/{name}",
                match method {
                    Method::PUT => put_policy(app, name, req).await,
                    Method::DELETE => delete_policy(app, name, req).await,
                    Method::GET => get_policy(app, name).await,
                    _ => allow("GET, PUT, DELETE"),
                },
            )
        }
        _ => (
            "other",
            Err(ApiError::not_found(format!("no route for {method} {path}"))),
        ),
    }
}

/// Decodes %XX escapes (a policy spec's `@` may arrive as %40); invalid escapes stay as they are.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error_response(e: &ApiError, body: &Value) -> Response<Body> {
    let mut r = json_response(e.status, body);
    if let Some(s) = e.retry_after
        && let Ok(v) = HeaderValue::from_str(&s.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn ready(app: &App) -> Response<Body> {
    let loaded = app.served.get().is_some();
    let draining = app.draining.load(Ordering::SeqCst);
    let (status, state) = match (loaded, draining) {
        (_, true) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        (true, false) => (StatusCode::OK, "ready"),
    };
    json_response(
        status,
        &json!({"status": state, "model": app.opts.model_id}),
    )
}

fn metrics(app: &App) -> Response<Body> {
    if let Some(served) = app.served.get() {
        let e = &served.engine;
        for (name, model) in [("target", Some(e.target())), ("draft", e.draft())] {
            if let Some(stats) = model.and_then(|m| m.batch_stats()) {
                app.metrics.sync_batches(name, stats);
            }
        }
        if let Some(p) = e.prompt_cache_stats() {
            app.metrics
                .prompt_cache_positions
                .set(i64::try_from(p.positions).unwrap_or(i64::MAX));
        }
    }
    let mut r = Response::new(Full::new(Bytes::from(app.metrics.encode())).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

fn models(app: &App) -> Response<Body> {
    let mut data = vec![model_object(app, &app.opts.model_id)];
    data.extend(app.opts.model_aliases.iter().map(|a| model_object(app, a)));
    data.extend(
        module_list(app)
            .iter()
            .map(|(n, p)| module_object(app, n, p)),
    );
    // OpenAI's list, with Anthropic's paging fields (its clients read the same route).
    let first = data.first().map(|m| m["id"].clone());
    let last = data.last().map(|m| m["id"].clone());
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "has_more": false,
                "first_id": first, "last_id": last}),
    )
}

/// The LoRA modules' names and adapter paths: those loaded, or while the model loads, those
/// it will have.
fn module_list(app: &App) -> Vec<(String, std::path::PathBuf)> {
    match app.served.get() {
        Some(s) => lock_read(&s.modules)
            .iter()
            .map(|m| (m.name.clone(), m.root.clone()))
            .collect(),
        None => app.opts.lora_modules.clone(),
    }
}

fn lock_read<T>(l: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// A LoRA module as `/v1/models` lists it (vLLM's shape: `parent` is the base model, `root`
/// the adapter).
fn module_object(app: &App, name: &str, root: &std::path::Path) -> Value {
    let mut v = model_object(app, name);
    v["parent"] = app.opts.model_id.clone().into();
    v["root"] = root.display().to_string().into();
    v
}

/// The base model as `/v1/models` lists it, under `id` (its id or an alias).
fn model_object(app: &App, id: &str) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": app.created,
        "owned_by": "verdict",
        // Anthropic's fields for the same model.
        "type": "model",
        "display_name": id,
        "created_at": message_batch::rfc3339(app.created),
        "ready": app.served.get().is_some(),
        "max_context": app.served.get().map(|s| s.engine.max_context()),
        // vLLM's name for the same number.
        "max_model_len": app.served.get().map(|s| s.engine.max_context()),
    })
}

/// `GET /v1/models/{id}`: the served model, or OpenAI's 404 for any other id.
fn model(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    if is_base_name(app, id) {
        return Ok(json_response(StatusCode::OK, &model_object(app, id)));
    }
    match module_list(app).into_iter().find(|(n, _)| n == id) {
        Some((n, p)) => Ok(json_response(StatusCode::OK, &module_object(app, &n, &p))),
        None => Err(unknown_model(app, id)),
    }
}

/// Whether `name` names the base model (its id or an alias).
fn is_base_name(app: &App, name: &str) -> bool {
    name == app.opts.model_id || app.opts.model_aliases.iter().any(|a| a == name)
}

/// A request that names a model must name the served one or one of its LoRA modules.
fn check_model(app: &App, served: &Served, p: &ParsedRequest) -> Result<(), ApiError> {
    module_of(app, served, p.model.as_deref()).map(|_| ())
}

/// The LoRA module `model` names, `None` for the base model (named or not); an unknown name is
/// OpenAI's 404.
fn module_of(app: &App, served: &Served, model: Option<&str>) -> Result<Option<Module>, ApiError> {
    match model {
        None => Ok(None),
        Some(m) if is_base_name(app, m) => Ok(None),
        Some(m) => match lock_read(&served.modules).iter().find(|x| x.name == m) {
            Some(x) => Ok(Some(x.clone())),
            None => Err(unknown_model(app, m)),
        },
    }
}

/// The engine and the model name a request is answered with (the module's, or the base's).
fn engine_of(
    app: &App,
    served: &Served,
    model: Option<&str>,
) -> Result<(Engine, String), ApiError> {
    Ok(match module_of(app, served, model)? {
        None => (served.engine.clone(), app.opts.model_id.clone()),
        Some(m) => (m.engine, m.name),
    })
}

/// OpenAI's 404 for a model this server does not serve.
fn unknown_model(app: &App, id: &str) -> ApiError {
    let mut names = vec![format!("`{}`", app.opts.model_id)];
    names.extend(app.opts.model_aliases.iter().map(|a| format!("`{a}`")));
    names.extend(module_list(app).iter().map(|(n, _)| format!("`{n}`")));
    ApiError::invalid(
        "model",
        format!(
            "the model `{id}` does not exist; this server serves {} (GET /v1/models)",
            names.join(", ")
        ),
    )
    .with_status(StatusCode::NOT_FOUND)
    .with_code("model_not_found")
}

async fn read_body(req: Request<Incoming>, limit: usize, what: &str) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(
            what,
            format!("the request body is larger than {limit} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

fn served_or_unavailable(app: &App) -> Result<Arc<Served>, ApiError> {
    if app.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    app.served.get().cloned().ok_or_else(|| {
        ApiError::unavailable("the model is still loading; retry shortly (GET /ready says when)")
    })
}

/// `POST /invocations`: the request goes to the route its fields name, as vLLM routes
/// SageMaker's invocations: `messages` chat, `prompt` completions, `input` embeddings, `query`
/// with `documents` rerank, `text_1` with `text_2` score.
async fn invocation(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = read_body(Request::new(body), app.opts.max_body_bytes, "body").await?;
    let o = api::json_object(&bytes)?;
    let has = |k: &str| o.contains_key(k);
    let req = Request::from_parts(
        parts,
        Full::new(bytes).map_err(|e| match e {}).boxed_unsync(),
    );
    if has("messages") {
        completion(app, Endpoint::Chat, req).await
    } else if has("prompt") {
        completion(app, Endpoint::Completions, req).await
    } else if has("input") {
        embeddings(app, req).await
    } else if has("query") && has("documents") {
        rerank(app, req).await
    } else if has("text_1") && has("text_2") {
        score(app, req).await
    } else {
        Err(ApiError::bad_request(
            "an invocation's fields name its route: messages (chat), prompt (completions), input (embeddings), query and documents (rerank), or text_1 and text_2 (score)",
        ))
    }
}

async fn completion(
    app: &Arc<App>,
    endpoint: Endpoint,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let arrived = Instant::now();
    let served = served_or_unavailable(app)?;
    let header_id = (req.headers().get("x-request-id"))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_owned);
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let mut obj = api::json_object(&body)?;
    api::with_defaults(&mut obj, &app.opts.generation_defaults);
    // vLLM's server-wide switches for what a request may also ask for itself.
    if app.opts.force_include_usage && obj.get("stream") == Some(&Value::Bool(true)) {
        let options = obj.entry("stream_options").or_insert_with(|| json!({}));
        // (Not an object: the parser names it.)
        if let Some(o) = options.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        }
    }
    let mut parsed = api::parse_object(endpoint, &obj)?;
    parsed.tokens_as_ids |= app.opts.tokens_as_ids;
    let begun = start(app, &served, &parsed, arrived).await?;
    let (early, rx) = begun.events;
    let prompts = 1 + parsed.more_prompts.len();
    let choices = prompts * parsed.n;
    // Named as vLLM names it: the X-Request-Id header, else the body's `request_id`.
    let name = (header_id.or_else(|| parsed.request_id.clone())).unwrap_or_else(|| new_id(app));
    let id = format!(
        "{}-{name}",
        if endpoint == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
    );
    let meta = ResponseMeta {
        id,
        created: unix_now(),
        model: model_name(app, &served, &parsed),
        endpoint,
        include_usage: parsed.include_usage,
        continuous_usage: parsed.continuous_usage,
        logprobs: parsed.logprobs,
        n: choices,
        per_prompt: parsed.n,
        tools: parsed.tools.is_some(),
        reasoning: (app.opts.reasoning)
            .filter(|_| endpoint == Endpoint::Chat)
            .map(|p| p.reading(begun.thinking_open)),
        prompt_ids: begun.prompts,
    };
    // `store: true` (chat): the answer is kept with the messages sent.
    let keep: Option<Keeper> = (endpoint == Endpoint::Chat && parsed.store).then(|| {
        let (app, meta) = (app.clone(), parsed.metadata.clone());
        let messages = obj.get("messages").and_then(Value::as_array).cloned();
        Box::new(move |v: Value| lock(&app.chats).insert(v, &messages.unwrap_or_default(), meta))
            as Keeper
    });
    if parsed.stream {
        // `best_of` above `n` is refused with a stream: each generation is a choice.
        Ok(sse_response(meta, early, rx, keep))
    } else {
        let candidates = parsed.candidates();
        let mut all = collect((early, rx), prompts * candidates).await?;
        copy_prompt_logprobs(&mut all, candidates);
        // Usage counts every generation, returned or not.
        let outcomes: Vec<&Outcome> = all.iter().filter_map(|c| c.outcome.as_ref()).collect();
        let total = Outcome::total(&outcomes, candidates);
        let choices = best_of(all, candidates, parsed.n);
        let v = meta.full(&choices, total);
        if let Some(keep) = keep {
            keep(v.clone());
        }
        Ok(json_response(StatusCode::OK, &v))
    }
}

/// `POST /v1/responses`: OpenAI's Responses API, run as the chat request it translates to
/// ([`responses`]).
async fn create_response(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let arrived = Instant::now();
    let served = served_or_unavailable(app)?;
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let id = format!("resp_{}", new_id(app));
    // Taken with the conversation's items, in one step; an error before the end lets it go.
    let mut lease = None;
    let mut t = responses::translate(&api::json_object(&body)?, &id, |c| match c {
        responses::Context::Response(p) => Ok(lock(&app.responses).context(p)),
        responses::Context::Conversation(c) => {
            Ok(
                conversations::Lease::take(&app.conversations, c)?.map(|(l, items)| {
                    lease = Some(l);
                    items
                }),
            )
        }
    })?;
    api::with_defaults(&mut t.chat, &app.opts.generation_defaults);
    let parsed = api::parse_object(Endpoint::Chat, &t.chat).map_err(responses::rename_param)?;
    let mut meta = responses::Meta::new(
        id,
        unix_now(),
        model_name(app, &served, &parsed),
        &t,
        parsed.tools.is_some(),
    );
    let keep = Keep { t, lease };
    if keep.t.background {
        // Started in its task: the request does not wait for a worker.
        check_model(app, &served, &parsed).map_err(responses::rename_param)?;
        return Ok(start_background(app, served, parsed, keep, meta, arrived));
    }
    let Begun {
        events,
        thinking_open: open,
        ..
    } = start(app, &served, &parsed, arrived)
        .await
        .map_err(responses::rename_param)?;
    meta.reasoning = app.opts.reasoning.map(|p| p.reading(open));
    if keep.t.stream {
        let stream = ResponseEvents {
            app: app.clone(),
            id: meta.id.clone(),
            stream: responses::Stream::new(meta),
            keep: Some(keep),
        };
        return Ok(typed_events(stream, events));
    }
    let choices = collect(events, 1).await?;
    let c = &choices[0];
    let o = c
        .outcome
        .as_ref()
        .ok_or_else(|| ApiError::internal("the generation ended without an outcome"))?;
    let r = meta.full(&c.text, &c.entries, o);
    keep.ended(app, &meta.id, &r);
    Ok(json_response(StatusCode::OK, &r))
}

/// What a response keeps when it ends: its request (the store keeps its input items) and its
/// hold on its conversation. Dropped instead (the response failed, or its client left), it
/// keeps nothing and lets the conversation go.
struct Keep {
    t: responses::Translated,
    lease: Option<conversations::Lease>,
}

impl Keep {
    fn ended(self, app: &App, id: &str, response: &Value) {
        if self.t.store {
            let items = self.t.input_items();
            lock(&app.responses).insert(id.to_string(), response.clone(), items);
        }
        if let Some(lease) = self.lease {
            let output = response["output"].as_array().into_iter().flatten();
            lease.commit(self.t.input.iter().chain(output).cloned().collect());
        }
    }
}

/// The store stays usable if a thread panicked while holding it (a poisoned lock): its
/// contents are replaced whole under the lock, never left half-written.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn missing_response(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no stored response `{id}` (responses are kept in memory, the last {} up to {} MiB, and only with `store`)",
        responses::STORE_CAPACITY,
        responses::STORE_BYTES >> 20
    ))
}

/// `GET /v1/responses/{id}`: a stored response, or a background one as it stands; with
/// `stream=true`, a streamed background response's events (after `starting_after`), then
/// those to come.
fn stored_response(app: &App, id: &str, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let (stream, after) = background::parse_query(query)?;
    let run = lock(&app.runs).get(id);
    if stream {
        return match run {
            Some(run) if run.stream => Ok(run_events(run, after)),
            _ if run.is_some() || lock(&app.responses).response(id).is_some() => {
                Err(ApiError::invalid(
                    "stream",
                    format!(
                        "response {id} was not created with background and stream: it has no events to read again"
                    ),
                ))
            }
            _ => Err(missing_response(id)),
        };
    }
    if let Some(run) = run {
        return Ok(json_response(StatusCode::OK, &run.response()));
    }
    let store = lock(&app.responses);
    let r = store.response(id).ok_or_else(|| missing_response(id))?;
    Ok(json_response(StatusCode::OK, r))
}

/// `GET /v1/responses/{id}/input_items`: the items a response was generated from (a
/// background one's while it runs too), newest first unless `order=asc`.
fn response_input_items(
    app: &App,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let q = conversations::parse_query(query, percent_decode)?;
    let items = match lock(&app.runs).get(id) {
        Some(run) => run.input_items.clone(),
        None => (lock(&app.responses).input_items(id))
            .ok_or_else(|| missing_response(id))?
            .to_vec(),
    };
    Ok(json_response(
        StatusCode::OK,
        &conversations::page(&items, &q)?,
    ))
}

/// `/v1/chat/completions/{id}[/messages]` (`rest`: the path after `/v1/chat/completions/`).
async fn stored_chat_route(
    app: &Arc<App>,
    method: Method,
    rest: &str,
    req: Request<Incoming>,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let allow = |allowed: &str| {
        Err(ApiError::method_not_allowed(format!(
            "{method} is not allowed on /v1/chat/completions/{rest} (allowed: {allowed})"
        )))
    };
    let ok = |v: Result<Value, ApiError>| v.map(|v| json_response(StatusCode::OK, &v));
    if let Some(id) = rest.strip_suffix("/messages") {
        let id = percent_decode(id);
        return (
            "/v1/chat/completions/{id}/messages",
            match method {
                Method::GET => {
                    ok(
                        chat_store::parse_query(req.uri().query(), false, percent_decode)
                            .and_then(|q| lock(&app.chats).messages(&id, &q)),
                    )
                }
                _ => allow("GET"),
            },
        );
    }
    let id = percent_decode(rest);
    (
        "/v1/chat/completions/{id}",
        match method {
            Method::GET => ok(lock(&app.chats).get(&id)),
            Method::POST => match read_body(req, app.opts.max_body_bytes, "body").await {
                Ok(b) => ok(api::json_object(&b).and_then(|b| lock(&app.chats).update(&id, &b))),
                Err(e) => Err(e),
            },
            Method::DELETE => ok(lock(&app.chats).delete(&id)),
            _ => allow("GET, POST, DELETE"),
        },
    )
}

/// `POST /v1/conversations`.
async fn create_conversation(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let body = api::json_object(&body)?;
    let id = format!("conv_{}", new_id(app));
    let c = lock(&app.conversations).create(id, unix_now(), &body)?;
    Ok(json_response(StatusCode::OK, &c))
}

/// `/v1/conversations/{id}[/items[/{item}]]` (`rest` is the path after `/v1/conversations/`).
async fn conversation_route(
    app: &Arc<App>,
    method: Method,
    rest: &str,
    req: Request<Incoming>,
) -> (&'static str, Result<Response<Body>, ApiError>) {
    let allow = |allowed: &str, path: &str| {
        Err(ApiError::method_not_allowed(format!(
            "{method} is not allowed on /v1/conversations/{path} (allowed: {allowed})"
        )))
    };
    let ok = |v: Result<Value, ApiError>| v.map(|v| json_response(StatusCode::OK, &v));
    let store = &app.conversations;
    let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let id = percent_decode(id);
    match (tail, tail.strip_prefix("items/")) {
        ("", _) => (
            "/v1/conversations/{id}",
            match method {
                Method::GET => ok(lock(store).get(&id)),
                Method::POST => match read_body(req, app.opts.max_body_bytes, "body").await {
                    Ok(b) => ok(api::json_object(&b).and_then(|b| lock(store).update(&id, &b))),
                    Err(e) => Err(e),
                },
                Method::DELETE => ok(lock(store).delete(&id)),
                _ => allow("GET, POST, DELETE", rest),
            },
        ),
        ("items", _) => (
            "/v1/conversations/{id}/items",
            match method {
                Method::GET => ok(
                    conversations::parse_query(req.uri().query(), percent_decode)
                        .and_then(|q| lock(store).items(&id, &q)),
                ),
                Method::POST => match read_body(req, app.opts.max_body_bytes, "body").await {
                    Ok(b) => ok(api::json_object(&b).and_then(|b| {
                        let tag = format!("{}_", new_id(app));
                        lock(store).add(&id, &tag, &b)
                    })),
                    Err(e) => Err(e),
                },
                _ => allow("GET, POST", rest),
            },
        ),
        (_, Some(item)) if !item.is_empty() => {
            let item = percent_decode(item);
            (
                "/v1/conversations/{id}/items/{item_id}",
                match method {
                    Method::GET => ok(lock(store).item(&id, &item)),
                    Method::DELETE => ok(lock(store).delete_item(&id, &item)),
                    _ => allow("GET, DELETE", rest),
                },
            )
        }
        _ => (
            "other",
            Err(ApiError::not_found(format!(
                "no route for {method} /v1/conversations/{rest}"
            ))),
        ),
    }
}

/// `DELETE /v1/responses/{id}` (a background response still running is cancelled).
fn delete_response(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    let run = lock(&app.runs).remove(id);
    if let Some(run) = &run {
        run.cancel();
    }
    if !lock(&app.responses).remove(id) && run.is_none() {
        return Err(missing_response(id));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "object": "response", "deleted": true}),
    ))
}

/// `POST /v1/responses/{id}/cancel`: a background response stops (`cancelled`); one that has
/// ended stays as it ended.
fn cancel_response(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    let Some(run) = lock(&app.runs).get(id) else {
        if lock(&app.responses).response(id).is_some() {
            return Err(ApiError::invalid(
                "response_id",
                format!(
                    "response {id} was not created with background: only a background response can be cancelled"
                ),
            ));
        }
        return Err(missing_response(id));
    };
    run.cancel();
    lock(&app.runs).ended(id);
    Ok(json_response(StatusCode::OK, &run.response()))
}

/// Runs a background response on in a task; answers with its `queued` object, or for `stream`
/// with its events as they come (a reader that leaves stops nothing).
fn start_background(
    app: &Arc<App>,
    served: Arc<Served>,
    parsed: ParsedRequest,
    keep: Keep,
    meta: responses::Meta,
    arrived: Instant,
) -> Response<Body> {
    let queued = meta.pending("queued");
    let cancelled = meta.pending("cancelled");
    let run = Arc::new(background::Run::new(
        meta.id.clone(),
        keep.t.stream,
        queued,
        cancelled,
        keep.t.input_items(),
    ));
    lock(&app.runs).add(run.clone());
    let task = tokio::spawn(run_background(
        app.clone(),
        run.clone(),
        (served, parsed, keep, meta),
        arrived,
    ));
    run.set_task(task.abort_handle());
    if run.stream {
        return run_events(run, None);
    }
    json_response(StatusCode::OK, &run.response())
}

/// A background response's events after `after`, as server-sent events, to its end.
fn run_events(run: Arc<background::Run>, after: Option<u64>) -> Response<Body> {
    let events = futures_util::StreamExt::map(run.follow(after), |e| {
        Ok::<_, Infallible>(Frame::data(typed_sse(e)))
    });
    event_stream(StreamBody::new(events))
}

/// A background response's generation: `queued` until a worker takes it (a full queue is
/// waited out, not an error), its events kept by its run, its end stored as a response's is.
async fn run_background(
    app: Arc<App>,
    run: Arc<background::Run>,
    (served, parsed, keep, mut meta): (Arc<Served>, ParsedRequest, Keep, responses::Meta),
    arrived: Instant,
) {
    let mut wait = Duration::from_millis(200);
    let begun = loop {
        match start(&app, &served, &parsed, arrived).await {
            Ok(b) => break Ok(b),
            // Room comes as requests finish (not while the server stops).
            Err(e)
                if e.status == StatusCode::TOO_MANY_REQUESTS
                    && !app.draining.load(Ordering::SeqCst) =>
            {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => break Err(responses::rename_param(e)),
        }
    };
    let Begun {
        events: (mut early, mut rx),
        thinking_open,
        ..
    } = match begun {
        Ok(b) => b,
        Err(e) => {
            let mut stream = responses::Stream::new(meta);
            let mut events = stream.start();
            events.extend(stream.failed(&e));
            finish_background(&app, &run, events);
            return;
        }
    };
    meta.reasoning = app.opts.reasoning.map(|p| p.reading(thinking_open));
    // The same events a streamed response gives (its end stored as theirs is).
    let mut stream = ResponseEvents {
        app: app.clone(),
        id: run.id.clone(),
        stream: responses::Stream::new(meta),
        keep: Some(keep),
    };
    run.push(stream.start());
    loop {
        let next = match early.pop_front() {
            Some(e) => Some(e),
            None => rx.recv().await,
        };
        let (events, done) = typed_step(&mut stream, next);
        if done {
            finish_background(&app, &run, events);
            return;
        }
        run.push(events);
    }
}

/// A background response's last events: its run ends with the object the last one carries.
fn finish_background(app: &App, run: &background::Run, events: Vec<Value>) {
    let response = (events.iter().rev())
        .find_map(|e| e.get("response"))
        .cloned()
        .unwrap_or_else(|| run.response());
    run.push(events);
    run.finish(response);
    lock(&app.runs).ended(&run.id);
}

/// What a typed event stream (the Responses and Messages APIs) makes of a generation's events.
trait TypedEvents: Send + Sync + 'static {
    /// The events before any text.
    fn start(&mut self) -> Vec<Value>;
    fn delta(&mut self, text: &str, entries: Vec<TokenEntry>) -> Vec<Value>;
    /// The closing events.
    fn done(&mut self, outcome: &Outcome) -> Vec<Value>;
    /// The generation failed after the stream started.
    fn failed(&mut self, e: &ApiError) -> Vec<Value>;
}

/// A streamed Responses reply: `response.created` to `response.completed` (no `[DONE]` in this
/// API); the finished reply is stored as when not streamed.
struct ResponseEvents {
    app: Arc<App>,
    stream: responses::Stream,
    id: String,
    keep: Option<Keep>,
}

impl TypedEvents for ResponseEvents {
    fn start(&mut self) -> Vec<Value> {
        self.stream.start()
    }

    fn delta(&mut self, text: &str, entries: Vec<TokenEntry>) -> Vec<Value> {
        self.stream.delta(text, entries)
    }

    fn done(&mut self, outcome: &Outcome) -> Vec<Value> {
        let (events, response) = self.stream.done(outcome);
        if let Some(keep) = self.keep.take() {
            keep.ended(&self.app, &self.id, &response);
        }
        events
    }

    fn failed(&mut self, e: &ApiError) -> Vec<Value> {
        self.stream.failed(e)
    }
}

/// A streamed Messages reply: `message_start` to `message_stop`.
struct MessageEvents {
    stream: messages::Stream,
    prompt_tokens: usize,
}

impl TypedEvents for MessageEvents {
    fn start(&mut self) -> Vec<Value> {
        self.stream.start(self.prompt_tokens)
    }

    fn delta(&mut self, text: &str, _: Vec<TokenEntry>) -> Vec<Value> {
        self.stream.delta(text)
    }

    fn done(&mut self, outcome: &Outcome) -> Vec<Value> {
        self.stream.done(outcome)
    }

    fn failed(&mut self, e: &ApiError) -> Vec<Value> {
        self.stream.failed(e)
    }
}

/// Typed server-sent events (`event: <type>`, `data: <object>`) from the generation's channel.
/// Dropping the body stops the generation.
fn typed_events(stream: impl TypedEvents, (early, rx): Events) -> Response<Body> {
    struct S<T> {
        stream: T,
        early: VecDeque<(usize, Event)>,
        rx: UnboundedReceiver<(usize, Event)>,
        started: bool,
        done: bool,
    }
    let state = S {
        stream,
        early,
        rx,
        started: false,
        done: false,
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        if !s.started {
            s.started = true;
            let b = typed_sse(s.stream.start());
            return Some((Ok::<_, Infallible>(Frame::data(b)), s));
        }
        let bytes = loop {
            let next = match s.early.pop_front() {
                Some(e) => Some(e),
                None => s.rx.recv().await,
            };
            let (events, done) = typed_step(&mut s.stream, next);
            s.done = done;
            if !events.is_empty() {
                break typed_sse(events);
            }
        };
        Some((Ok::<_, Infallible>(Frame::data(bytes)), s))
    });
    event_stream(StreamBody::new(body))
}

/// What a typed stream makes of the generation's next event (`None`: its worker stopped), and
/// whether that ended the reply.
fn typed_step(stream: &mut impl TypedEvents, next: Option<(usize, Event)>) -> (Vec<Value>, bool) {
    match next {
        Some((_, Event::Delta(d, e))) => (stream.delta(&d, e), false),
        Some((
            _,
            Event::Started | Event::Prefilled | Event::Progress { .. } | Event::PromptLogprobs(_),
        )) => (Vec::new(), false),
        Some((_, Event::Done(o))) => (stream.done(&o), true),
        Some((_, Event::Failed(e))) => (stream.failed(&e), true),
        None => {
            let e = ApiError::internal("the generation worker stopped unexpectedly");
            (stream.failed(&e), true)
        }
    }
}

/// Server-sent events named by their `type` (`event: <type>`, `data: <object>`), as the
/// Responses and Messages APIs stream them.
fn typed_sse(events: Vec<Value>) -> Bytes {
    let mut s = String::new();
    for e in events {
        s.push_str("event: ");
        s.push_str(e["type"].as_str().unwrap_or("message"));
        s.push_str("\ndata: ");
        s.push_str(&e.to_string());
        s.push_str("\n\n");
    }
    Bytes::from(s)
}

/// `POST /v1/messages`: Anthropic's Messages API, run as the chat request it translates to
/// ([`messages`]).
async fn create_message(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let arrived = Instant::now();
    let served = served_or_unavailable(app)?;
    let body = api::json_object(&read_body(req, app.opts.max_body_bytes, "body").await?)?;
    messages::require_max_tokens(&body)?;
    let mut t = messages::translate(&body)?;
    api::with_defaults(&mut t.chat, &app.opts.generation_defaults);
    let parsed = api::parse_object(Endpoint::Chat, &t.chat).map_err(messages::rename_param)?;
    let Begun {
        events,
        prompt_tokens,
        thinking_open: open,
        ..
    } = start(app, &served, &parsed, arrived)
        .await
        .map_err(messages::rename_param)?;
    let meta = messages::Meta {
        id: format!("msg_{}", new_id(app)),
        model: model_name(app, &served, &parsed),
        tools: parsed.tools.is_some(),
        reasoning: app.opts.reasoning.map(|p| p.reading(open)),
    };
    if t.stream {
        let stream = MessageEvents {
            stream: messages::Stream::new(meta),
            prompt_tokens,
        };
        return Ok(typed_events(stream, events));
    }
    let choices = collect(events, 1).await?;
    let c = &choices[0];
    let o = c
        .outcome
        .as_ref()
        .ok_or_else(|| ApiError::internal("the generation ended without an outcome"))?;
    Ok(json_response(StatusCode::OK, &meta.full(&c.text, o)))
}

/// `POST /v1/messages/count_tokens`: the prompt's length in tokens, as `/v1/messages` would
/// read it (system, messages, tools).
async fn count_message_tokens(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let served = served_or_unavailable(app)?;
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let t = messages::translate(&api::json_object(&body)?)?;
    let p = api::parse_object(Endpoint::Chat, &t.chat).map_err(messages::rename_param)?;
    check_model(app, &served, &p)?;
    let n = blocking(move || chat_prompt(&served, &p).map(|ids| ids.len()))
        .await?
        .map_err(messages::rename_param)?;
    Ok(json_response(StatusCode::OK, &json!({"input_tokens": n})))
}

/// `POST /v1/responses/input_tokens`: the prompt tokens a Responses request makes, its
/// context (a previous response's or a conversation's items) included; `input` may be left out.
async fn count_response_tokens(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let served = served_or_unavailable(app)?;
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let mut body = api::json_object(&body)?;
    body.entry("input").or_insert(json!([]));
    // Read, not taken: counting runs nothing on the conversation.
    let t = responses::translate(&body, "resp_count", |c| {
        Ok(match c {
            responses::Context::Response(p) => lock(&app.responses).context(p),
            responses::Context::Conversation(c) => lock(&app.conversations).items_of(c),
        })
    })?;
    let p = api::parse_object(Endpoint::Chat, &t.chat).map_err(responses::rename_param)?;
    check_model(app, &served, &p).map_err(responses::rename_param)?;
    let n = blocking(move || chat_prompt(&served, &p).map(|ids| ids.len()))
        .await?
        .map_err(responses::rename_param)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "response.input_tokens", "input_tokens": n}),
    ))
}

/// The model a (checked) request is answered as: the LoRA module it names, or the base model.
fn model_name(app: &App, served: &Served, p: &ParsedRequest) -> String {
    match module_of(app, served, p.model.as_deref()) {
        Ok(Some(m)) => m.name,
        _ => app.opts.model_id.clone(),
    }
}

/// A fresh id suffix for a response (unique in this server, not guessable).
fn new_id(app: &App) -> String {
    format!(
        "{:08x}{:08x}",
        unix_now() as u32,
        app.next_id.fetch_add(1, Ordering::Relaxed) as u32 ^ rand::random::<u32>()
    )
}

/// The events of a request's choices, tagged with the choice's index: those that arrived
/// before every choice started, and the channel of the rest.
type Events = (VecDeque<(usize, Event)>, UnboundedReceiver<(usize, Event)>);

/// A request whose generations have all started.
struct Begun {
    events: Events,
    /// The prompts' tokens, all prompts together.
    prompt_tokens: usize,
    /// The template opened a thinking block for the model.
    thinking_open: bool,
    /// With `return_token_ids` (else empty): each prompt's token ids (what the model read,
    /// after templates and truncation).
    prompts: Vec<Vec<u32>>,
}

/// Prepares a parsed request and starts its generations (one per choice); returns once every
/// choice has started, so that a refused request is an HTTP error and not a broken stream.
async fn start(
    app: &Arc<App>,
    served: &Arc<Served>,
    parsed: &ParsedRequest,
    arrived: Instant,
) -> Result<Begun, ApiError> {
    let (engine, _) = engine_of(app, served, parsed.model.as_deref())?;
    // Tokenizing and template rendering are CPU work: off the async threads. A completions
    // request may hold several prompts: each is prepared as a request of its own.
    let prepared: Vec<GenerateRequest> = {
        let app = app.clone();
        let served = served.clone();
        let parsed = parsed.clone();
        tokio::task::spawn_blocking(move || {
            if parsed.more_prompts.is_empty() {
                return prepare(&app, &served, &parsed).map(|r| vec![r]);
            }
            let mut one = ParsedRequest {
                more_prompts: Vec::new(),
                ..parsed.clone()
            };
            let prompts = parsed.prompt.iter().chain(&parsed.more_prompts);
            prompts
                .enumerate()
                .map(|(k, p)| {
                    one.prompt = Some(p.clone());
                    // An error about the prompt names which one: `prompt[k]...`.
                    prepare(&app, &served, &one).map_err(|e| {
                        let at = e.param.as_deref().and_then(|p| p.strip_prefix("prompt"));
                        match at {
                            Some(rest) => {
                                let param = format!("prompt[{k}]{rest}");
                                e.with_param(param)
                            }
                            _ => e,
                        }
                    })
                })
                .collect::<Result<_, _>>()
        })
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))??
    };
    let n = parsed.candidates();
    let total = prepared.len() * n;
    // One generation per choice (choice j of prompt k at index k * n + j); their events reach
    // this handler on one channel, tagged with the choice's index. Dropping it (the client
    // left) closes every choice's channel in turn, which stops its generation.
    let (all_tx, mut rx) = mpsc::unbounded_channel::<(usize, Event)>();
    // Every choice that echoes a scored prompt scores it (a prompt to score is read whole);
    // vLLM's `prompt_logprobs` alone are scored by each prompt's choice 0, and copied to the
    // others (`copy_prompt_logprobs`).
    let echo_scored = parsed.echo && parsed.logprobs.is_some();
    // (A request that only scores its prompt, `max_tokens: 0`, scores it in every choice.)
    let scores = |i: usize| echo_scored || i.is_multiple_of(n) || parsed.max_tokens == Some(0);
    // With a prompt cache, each prompt's choice 0 prefills alone and shares the prompt's
    // sequences; its other choices start once it has, and read the prompt from the cache
    // instead of each prefilling it.
    let share = n > 1 && engine.prompt_cache_stats().is_some() && !echo_scored;
    let prompt_tokens = prepared.iter().map(|r| r.prompt.len()).sum();
    // The template opened a thinking block for the model (its reply starts inside it).
    let first = &prepared[0].prompt;
    let tail = &first[first.len().saturating_sub(16)..];
    let thinking_open = app.opts.reasoning.is_some()
        && (served.tokenizer.decode(tail, false)).is_ok_and(|t| reasoning::opens_thinking(&t));
    // Kept only for `return_token_ids`.
    let prompts = match parsed.return_token_ids {
        true => prepared.iter().map(|r| r.prompt.clone()).collect(),
        false => Vec::new(),
    };
    let mut requests: Vec<Option<GenerateRequest>> = Vec::with_capacity(total);
    for r in prepared {
        let others: Vec<_> = (1..n)
            .map(|j| {
                let mut c = choice_request(&r, j);
                c.prompt_logprobs = c.prompt_logprobs.filter(|_| scores(j));
                Some(c)
            })
            .collect();
        requests.push(Some(r));
        requests.extend(others);
    }
    let submit = |i: usize, request: GenerateRequest| -> Result<(), ApiError> {
        let (tx, mut choice_rx) = mpsc::unbounded_channel();
        let job = Job {
            served: served.clone(),
            engine: engine.clone(),
            request,
            stop: parsed.stop.clone(),
            arrived,
            events: tx,
            metrics: app.metrics.clone(),
            echo: parsed.echo,
            ignore_eos: parsed.ignore_eos,
            share_prompt: share && i.is_multiple_of(n),
            keep_special: parsed.tools.is_some() || !parsed.skip_special,
            grammar_field: parsed.grammar.as_ref().map(|(field, _)| *field),
            mask_field: mask_field(parsed),
            include_stop: parsed.include_stop,
            tokens_as_ids: parsed.tokens_as_ids,
            stop_token_ids: parsed.stop_token_ids.clone(),
            prompt_logprobs: parsed.prompt_logprobs.filter(|_| scores(i)),
            token_ids: parsed.return_token_ids,
        };
        // A batch line's generations queue behind every client request's.
        let batch_line = BATCH_LINE.try_with(|_| ()).is_ok();
        let priority = parsed.priority + if batch_line { BATCH_PRIORITY } else { 0 };
        app.pool
            .submit_at(priority, Box::new(move || job.run()))
            .map_err(at_capacity)?;
        let all_tx = all_tx.clone();
        // Ends when the choice does or the handler is gone (then dropping `choice_rx` tells
        // the generation, even one still queued, that nobody listens). A generation that stops
        // without a word (a bug that panicked) fails its request instead of leaving it waiting.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    e = choice_rx.recv() => {
                        let Some(e) = e else {
                            let e = ApiError::internal("the generation stopped unexpectedly");
                            let _ = all_tx.send((i, Event::Failed(e)));
                            break;
                        };
                        let last = matches!(e, Event::Done(_) | Event::Failed(_));
                        if all_tx.send((i, e)).is_err() || last {
                            break;
                        }
                    }
                    _ = all_tx.closed() => break,
                }
            }
        });
        Ok(())
    };
    // Choices i.. of `range` not submitted yet.
    let mut submit_range = |range: std::ops::Range<usize>| -> Result<(), ApiError> {
        for i in range {
            if let Some(r) = requests[i].take() {
                submit(i, r)?;
            }
        }
        Ok(())
    };
    for k in 0..total / n {
        // With sharing, each prompt's choice 0 alone; its others once it has shared.
        submit_range(k * n..if share { k * n + 1 } else { (k + 1) * n })?;
    }
    // Every choice must start before the response does (a refused request is an HTTP error,
    // not a 200 stream); the events of choices already running are kept meanwhile.
    let mut early = VecDeque::new();
    let mut started = 0;
    while started < total {
        let e = rx.recv().await;
        if let Some((i, Event::Prefilled | Event::Done(_))) = &e
            && i.is_multiple_of(n)
        {
            submit_range(i + 1..i + n)?;
        }
        match e {
            Some((_, Event::Started)) => started += 1,
            Some((_, Event::Prefilled)) => {}
            Some((_, Event::Failed(e))) => return Err(e),
            Some(e) => early.push_back(e),
            None => {
                return Err(ApiError::internal(
                    "the generation worker stopped before starting",
                ));
            }
        }
    }
    drop(all_tx);
    Ok(Begun {
        events: (early, rx),
        prompt_tokens,
        thinking_open,
        prompts,
    })
}

/// Every choice's whole text, logprobs and outcome (a request that is not streamed).
async fn collect((mut early, mut rx): Events, n: usize) -> Result<Vec<Choice>, ApiError> {
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    let mut done = 0;
    while done < n {
        let next = match early.pop_front() {
            Some(e) => Some(e),
            None => rx.recv().await,
        };
        match next {
            Some((i, Event::Delta(d, e))) => {
                choices[i].text.push_str(&d);
                choices[i].entries.extend(e);
            }
            Some((i, Event::Done(o))) => {
                choices[i].outcome = Some(*o);
                done += 1;
            }
            Some((i, Event::PromptLogprobs(v))) => choices[i].prompt_logprobs = Some(v),
            Some((_, Event::Failed(e))) => return Err(e),
            Some((_, Event::Started | Event::Prefilled | Event::Progress { .. })) => {}
            None => {
                return Err(ApiError::internal(
                    "the generation worker stopped unexpectedly",
                ));
            }
        }
    }
    Ok(choices)
}

/// Each prompt's choices after the first get its `prompt_logprobs` (only its first scores it).
fn copy_prompt_logprobs(choices: &mut [Choice], per_prompt: usize) {
    for group in choices.chunks_mut(per_prompt.max(1)) {
        if let [first, rest @ ..] = group {
            for c in rest.iter_mut().filter(|c| c.prompt_logprobs.is_none()) {
                c.prompt_logprobs = first.prompt_logprobs.clone();
            }
        }
    }
}

/// OpenAI's `best_of`: of each prompt's `candidates` generations, the `n` whose tokens the
/// target finds likeliest (mean log-probability per token at temperature 1, the token that ended
/// the output included; [`Outcome::mean_logprob`]), likeliest first (ties: the earlier). With
/// as many candidates as choices, all of them in their order.
fn best_of(all: Vec<Choice>, candidates: usize, n: usize) -> Vec<Choice> {
    if candidates <= n {
        return all;
    }
    let score = |c: &Choice| {
        let s = c.outcome.as_ref().and_then(|o| o.mean_logprob);
        s.filter(|s| !s.is_nan()).unwrap_or(f64::NEG_INFINITY)
    };
    let mut all = all.into_iter().peekable();
    let mut out = Vec::new();
    while all.peek().is_some() {
        let mut group: Vec<Choice> = all.by_ref().take(candidates).collect();
        // A stable sort: equal scores keep their order.
        group.sort_by(|a, b| score(b).total_cmp(&score(a)));
        out.extend(group.into_iter().take(n));
    }
    out
}

/// Choice `i`'s copy of a request (`n` > 1): the same prompt and parameters, and a seed of its
/// own (seed + i) so that seeded choices differ from each other and still reproduce. Every
/// field is listed, so a new one cannot be forgotten here.
fn choice_request(r: &GenerateRequest, i: usize) -> GenerateRequest {
    let GenerateRequest {
        prompt,
        max_tokens,
        sampling,
        seed,
        stop_tokens,
        speculation,
        policy,
        policy_params,
        adaptive,
        trace: _,
        logprobs,
        penalties,
        prompt_logprobs,
        grammar,
        cache_salt,
        prediction,
    } = r;
    GenerateRequest {
        prompt: prompt.clone(),
        max_tokens: *max_tokens,
        sampling: *sampling,
        seed: seed.map(|s| s.wrapping_add(i as u64)),
        stop_tokens: stop_tokens.clone(),
        speculation: speculation.clone(),
        policy: policy.clone(),
        policy_params: policy_params.clone(),
        adaptive: *adaptive,
        trace: None,
        logprobs: *logprobs,
        penalties: penalties.clone(),
        prompt_logprobs: *prompt_logprobs,
        grammar: grammar.clone(),
        cache_salt: cache_salt.clone(),
        prediction: prediction.clone(),
    }
}

/// One choice's text, logprobs and end, as its events arrive.
#[derive(Default)]
struct Choice {
    text: String,
    entries: Vec<TokenEntry>,
    outcome: Option<Outcome>,
    /// vLLM's `prompt_logprobs`, when asked for.
    prompt_logprobs: Option<Value>,
}

/// `POST /tokenize` (vLLM's shape): the token ids a completion's `prompt` or a chat's
/// `messages` become, exactly as those requests tokenize them (template, BOS, special tokens),
/// with their count and the model's context length.
async fn tokenize(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let served = served_or_unavailable(app)?;
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let (t, strs, framing) = api::parse_tokenize(&body)?;
    let ctx = served.engine.max_context();
    let tokenizer = served.tokenizer.clone();
    let ids = blocking(move || {
        let tokenizer = &*served.tokenizer;
        match t {
            api::TokenizeInput::Prompt(text) => text_prompt(tokenizer, &text, framing),
            api::TokenizeInput::Messages {
                messages,
                continue_final,
                template_vars,
            } => chat_prompt_of(
                &served,
                &messages,
                None,
                (continue_final, framing),
                template_vars.as_ref(),
            ),
        }
    })
    .await??;
    let mut v = json!({"tokens": ids, "count": ids.len(), "max_model_len": ctx});
    if strs {
        // Each token as the vocabulary writes it (`Ġworld`), as vLLM's (Hugging Face's
        // `convert_ids_to_tokens`).
        let text = |&id: &u32| tokenizer.token_text(id).unwrap_or_default();
        v["token_strs"] = json!(ids.iter().map(text).collect::<Vec<_>>());
    }
    Ok(json_response(StatusCode::OK, &v))
}

/// `POST /v1/embeddings`: one pool job embeds every input (a worker's turn, like a generation;
/// 429 when the queue is full).
async fn embeddings(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let served = served_or_unavailable(app)?;
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let r = api::parse_embeddings(&body)?;
    let base64 = r.base64;
    let (vectors, tokens) = embed(app, &served, r).await?;
    Ok(json_response(
        StatusCode::OK,
        &super::embeddings::body(&app.opts.model_id, base64, &vectors, tokens),
    ))
}

/// Embeds a request's inputs in one pool job (a worker's turn, like a generation; 429 when
/// the queue is full), pooled as `--pooling` says, else the GGUF, else by the last token.
async fn embed(
    app: &Arc<App>,
    served: &Arc<Served>,
    r: api::EmbeddingsRequest,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    if module_of(app, served, r.model.as_deref())?.is_some() {
        return Err(ApiError::invalid(
            "model",
            "embeddings come from the base model; name it (or no model), not a LoRA module",
        ));
    }
    let pooling = match app.opts.pooling {
        Some(p) => p,
        None => match served.engine.target().gguf_metadata() {
            Some(meta) => Pooling::of_gguf(meta)
                .map_err(|e| ApiError::bad_request(format!("this model gives no embeddings: {e}")))?
                .unwrap_or(Pooling::Last),
            None => Pooling::Last,
        },
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = {
        let served = served.clone();
        move || {
            let out = super::embeddings::run(&served, &r, pooling, || tx.is_closed());
            let _ = tx.send(out);
        }
    };
    app.pool.submit(Box::new(job)).map_err(at_capacity)?;
    let (vectors, tokens) = rx
        .await
        .map_err(|_| ApiError::internal("the embedding job ended without a result"))??;
    app.metrics.embedded_tokens.inc_by(tokens as u64);
    Ok((vectors, tokens))
}

/// Texts to embed, each named in errors as given.
fn embedding_of(model: Option<String>, texts: Vec<(String, String)>) -> api::EmbeddingsRequest {
    let (names, texts): (Vec<String>, Vec<String>) = texts.into_iter().unzip();
    api::EmbeddingsRequest {
        model,
        inputs: texts.into_iter().map(api::EmbedInput::Text).collect(),
        base64: false,
        dimensions: None,
        names,
    }
}

/// `POST /v1/rerank` (also `/rerank`, `/v2/rerank`, as vLLM routes it): the documents ranked
/// by the cosine similarity of their embeddings to the query's (a bi-encoder's score).
async fn rerank(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let served = served_or_unavailable(app)?;
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let r = api::parse_rerank(&body)?;
    let docs = r.documents.iter().enumerate();
    let texts = std::iter::once(("query".to_string(), r.query.clone()))
        .chain(docs.map(|(i, d)| (format!("documents[{i}]"), d.clone())))
        .collect();
    let (vectors, tokens) = embed(app, &served, embedding_of(r.model.clone(), texts)).await?;
    let id = format!("rerank-{}", new_id(app));
    let v = super::embeddings::rerank_body(id, &app.opts.model_id, &r, &vectors, tokens);
    Ok(json_response(StatusCode::OK, &v))
}

/// `POST /v1/score` (also `/score`): each `text_2`'s cosine similarity to its `text_1` (the one
/// `text_1`, or the one at its index), from their embeddings.
async fn score(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let served = served_or_unavailable(app)?;
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let r = api::parse_score(&body)?;
    let named = |field: &str, t: &[String]| -> Vec<(String, String)> {
        let name = |i: usize| match t.len() {
            1 => field.to_string(),
            _ => format!("{field}[{i}]"),
        };
        t.iter()
            .enumerate()
            .map(|(i, x)| (name(i), x.clone()))
            .collect()
    };
    let mut texts = named("text_1", &r.text_1);
    texts.extend(named("text_2", &r.text_2));
    let (vectors, tokens) = embed(app, &served, embedding_of(r.model.clone(), texts)).await?;
    let (firsts, seconds) = vectors.split_at(r.text_1.len());
    let data: Vec<Value> = seconds
        .iter()
        .enumerate()
        .map(|(j, b)| {
            let a = &firsts[if firsts.len() == 1 { 0 } else { j }];
            json!({"index": j, "object": "score", "score": super::embeddings::similarity(a, b)})
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "id": format!("score-{}", new_id(app)),
            "object": "list",
            "created": unix_now(),
            "model": app.opts.model_id,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    ))
}

/// `POST /v1/files`: a batch input file (multipart/form-data: `file`, `purpose`).
async fn upload_file(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let max = app.opts.max_file_bytes;
    let ct = (req.headers().get(header::CONTENT_TYPE))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Room for the form around the file.
    let limit = max.saturating_add(64 << 10);
    let declared = (req.headers().get(header::CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    // Refused before a byte is read: too large, or no room left in the store.
    if let Some(n) = declared {
        let too_large = |why: String| Err(ApiError::too_large("file", why));
        if n > limit {
            return too_large(format!(
                "the upload has {n} bytes; a file may have at most {max} (--max-file-bytes)"
            ));
        }
        let room = app
            .opts
            .file_store_bytes
            .saturating_sub(lock(&app.batches).bytes());
        if n > room.saturating_add(64 << 10) {
            return too_large(format!(
                "the upload has {n} bytes and the file store room for {room} more (--max-file-store-bytes): delete files first (DELETE /v1/files/{{id}})"
            ));
        }
    }
    let body = read_body(req, limit, "file").await?;
    let up = batch::parse_upload(ct.as_deref(), body).await?;
    if up.data.len() > max {
        return Err(ApiError::too_large(
            "file",
            format!(
                "the file has {} bytes; at most {max} (--max-file-bytes)",
                up.data.len()
            ),
        ));
    }
    let f = batch::File::new(up.filename, &up.purpose, unix_now(), up.data);
    let f = lock(&app.batches).upload(f, app.opts.file_store_bytes)?;
    if let Some(disk) = &app.disk {
        let saved = {
            let (disk, f) = (disk.clone(), f.clone());
            flat(blocking(move || disk.save_file(&f)).await)
        };
        if let Err(e) = saved {
            let _ = lock(&app.batches).delete_file(&f.id);
            disk.delete_file(&f.id);
            return Err(ApiError::internal(format!(
                "cannot keep the file in --batch-dir: {e:#}"
            )));
        }
    }
    Ok(json_response(StatusCode::OK, &f.json()))
}

/// `GET /v1/files` and `GET /v1/batches`: newest first, paged (`limit`, `after`).
fn list(app: &App, query: Option<&str>, files: bool) -> Result<Response<Body>, ApiError> {
    let q = batch::parse_query(query, files, percent_decode)?;
    let store = lock(&app.batches);
    let page = if files {
        store.files(&q)?
    } else {
        store.batches(&q)?
    };
    Ok(json_response(StatusCode::OK, &page))
}

fn file_object(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    Ok(json_response(
        StatusCode::OK,
        &lock(&app.batches).file(id)?.json(),
    ))
}

/// `GET /v1/files/{id}/content`: the file's bytes (a batch's output: JSONL).
fn file_content(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    let f = lock(&app.batches).file(id)?;
    let mut r = Response::new(Full::new(f.data.clone()).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(r)
}

fn delete_file(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    let deleted = lock(&app.batches).delete_file(id)?;
    if let Some(disk) = &app.disk {
        disk.delete_file(id);
    }
    Ok(json_response(StatusCode::OK, &deleted))
}

fn get_batch(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    Ok(json_response(
        StatusCode::OK,
        &lock(&app.batches).batch(batch::Api::OpenAi, id)?.json(),
    ))
}

/// `POST /v1/batches/{id}/cancel`: lines not started are not run, running ones end; the
/// answers so far are kept in the output files.
fn cancel_batch(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    let b = lock(&app.batches).batch(batch::Api::OpenAi, id)?;
    b.cancel(unix_now())?;
    save_batch(app, &b);
    Ok(json_response(StatusCode::OK, &b.json()))
}

/// `POST /v1/batches`: checks the input file's lines (a bad one fails the batch, its errors
/// listed) and runs them in the background.
async fn create_batch(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    if app.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let create = batch::parse_create(&body)?;
    let input = (lock(&app.batches).file(&create.input_file_id))
        .map_err(|e| e.with_param("input_file_id"))?;
    if input.purpose != batch::PURPOSE {
        return Err(ApiError::invalid(
            "input_file_id",
            format!(
                "file {} has purpose {:?}; a batch reads a file uploaded with purpose \"{}\"",
                input.id,
                input.purpose,
                batch::PURPOSE
            ),
        ));
    }
    let lines = batch::parse_input(&input.data, Some(&create.endpoint));
    let counted = lines.as_ref().map(Vec::len).map_err(Clone::clone);
    let b = Arc::new(batch::Batch::new(create, unix_now(), counted));
    start_batch(app, &b, lines.ok().map(|l| (&*input, l)))?;
    Ok(json_response(StatusCode::OK, &b.json()))
}

/// Lists a new batch and runs its lines in the background (`None`: a batch that failed its
/// check, only listed).
fn start_batch(
    app: &App,
    b: &Arc<batch::Batch>,
    run: Option<(&batch::File, Vec<batch::Line>)>,
) -> Result<(), ApiError> {
    // Written before the batch is listed, with no await between (a dropped request leaves no
    // batch on disk that the server does not run); the input is a hard link where it can be,
    // the record small.
    if let Some(disk) = &app.disk {
        disk.save_batch(b, run.as_ref().map(|(input, _)| *input))
            .map_err(|e| {
                ApiError::internal(format!("cannot keep the batch in --batch-dir: {e:#}"))
            })?;
    }
    let forgotten = lock(&app.batches).add_batch(b.clone());
    if let Some(disk) = &app.disk {
        forgotten.iter().for_each(|id| disk.forget_batch(id));
    }
    if let Some((_, lines)) = run {
        // (The receiver lives as long as the server.)
        let _ = app.batch_tx.send((
            b.clone(),
            lines.into_iter().enumerate().collect(),
            Vec::new(),
        ));
    }
    Ok(())
}

/// Where a client reached this server (`http://host:port`, from the request's authority or
/// Host header), for the absolute URLs an API hands out; `None` when it names no plain host.
fn origin(app: &App, req: &Request<Incoming>) -> Option<String> {
    let host = match req.uri().authority() {
        Some(a) => a.as_str().to_owned(),
        None => req.headers().get(header::HOST)?.to_str().ok()?.to_owned(),
    };
    let plain = !host.is_empty()
        && (host.bytes()).all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    let scheme = if app.opts.tls.is_some() {
        "https"
    } else {
        "http"
    };
    plain.then(|| format!("{scheme}://{host}"))
}

fn message_batch(app: &App, id: &str) -> Result<Arc<batch::Batch>, ApiError> {
    lock(&app.batches).batch(batch::Api::Anthropic, id)
}

/// `POST /v1/messages/batches`: checks the requests (a bad one refuses the batch, named) and
/// runs them in the background.
async fn create_message_batch(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let origin = origin(app, &req);
    // A batch's requests may be as large as a batch file.
    let limit = app.opts.max_body_bytes.max(app.opts.max_file_bytes);
    let body = read_body(req, limit, "body").await?;
    if app.draining.load(Ordering::SeqCst) {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    let (data, lines) = message_batch::parse_create(&body)?;
    let b = Arc::new(batch::Batch::messages(lines.len(), unix_now()));
    // The lines as a file only `--batch-dir` keeps (to go on after a restart).
    let input = batch::File::new(format!("{}.jsonl", b.id), batch::PURPOSE, unix_now(), data);
    start_batch(app, &b, Some((&input, lines)))?;
    Ok(json_response(
        StatusCode::OK,
        &message_batch::json(&b, origin.as_deref()),
    ))
}

/// `GET /v1/messages/batches`: newest first, paged (`limit`, `after_id`, `before_id`).
fn list_message_batches(app: &App, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let q = message_batch::parse_query(req.uri().query(), percent_decode)?;
    let origin = origin(app, req);
    let items = (lock(&app.batches).batches_of(batch::Api::Anthropic))
        .map(|b| (b.id.clone(), message_batch::json(b, origin.as_deref())))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &message_batch::page(items, &q)?,
    ))
}

fn get_message_batch(
    app: &App,
    id: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let b = message_batch(app, id)?;
    Ok(json_response(
        StatusCode::OK,
        &message_batch::json(&b, origin(app, req).as_deref()),
    ))
}

/// `POST /v1/messages/batches/{id}/cancel`: requests not started are not run (`canceled`),
/// running ones end; the batch ends once they have.
fn cancel_message_batch(
    app: &App,
    id: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let b = message_batch(app, id)?;
    b.cancel(unix_now())?;
    save_batch(app, &b);
    Ok(json_response(
        StatusCode::OK,
        &message_batch::json(&b, origin(app, req).as_deref()),
    ))
}

/// `DELETE /v1/messages/batches/{id}`: an ended batch and its results.
fn delete_message_batch(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    let b = lock(&app.batches).delete_batch(batch::Api::Anthropic, id)?;
    if let Some(disk) = &app.disk {
        disk.forget_batch(&b.id);
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": b.id, "type": "message_batch_deleted"}),
    ))
}

/// `GET /v1/messages/batches/{id}/results`: the results, JSONL, once processing has ended.
fn message_batch_results(app: &App, id: &str) -> Result<Response<Body>, ApiError> {
    let b = message_batch(app, id)?;
    let Some(f) = lock(&app.batches).results(&b.id) else {
        return Err(if b.ended() {
            ApiError::not_found(format!(
                "batch {id} has no results (its requests were lost)"
            ))
        } else {
            ApiError::bad_request(format!(
                "batch {id} is still processing: its results are ready once its processing_status is \"ended\""
            ))
        });
    };
    let mut r = Response::new(Full::new(f.data.clone()).boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-jsonl"),
    );
    Ok(r)
}

/// Writes a batch's record where `--batch-dir` keeps it (a failure is logged: the batch goes on
/// in memory).
fn save_batch(app: &App, b: &batch::Batch) {
    if let Some(disk) = &app.disk
        && let Err(e) = disk.save_batch(b, None)
    {
        tracing::warn!("--batch-dir: cannot save batch {}: {e:#}", b.id);
    }
}

/// Runs a batch's lines in the background (those not `answered` before a restart), then
/// stores its output and error files.
async fn run_batch(
    app: Arc<App>,
    b: Arc<batch::Batch>,
    lines: Vec<(usize, batch::Line)>,
    answered: Vec<(usize, batch::Outcome)>,
) {
    // Lines wait for the model rather than fail while it loads.
    while app.served.get().is_none()
        && !app.draining.load(Ordering::SeqCst)
        && b.stop(unix_now()).is_none()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stop = || {
        if app.draining.load(Ordering::SeqCst) {
            Some(batch::Stop::ShuttingDown)
        } else {
            b.stop(unix_now())
        }
    };
    let done = |i: usize, o: &batch::Outcome| {
        b.count(o);
        // An answer is kept as it comes, for a restart; one never answered is not.
        if let Some(disk) = &app.disk
            && o.stopped.is_none()
            && let Err(e) = disk.save_answer(&b.id, i, o)
        {
            tracing::warn!("--batch-dir: cannot save an answer of batch {}: {e}", b.id);
        }
    };
    let (mut out, why) = batch::run(
        b.api,
        lines,
        app.opts.workers,
        &app.batch_gate,
        |url, body| dispatch(&app, url, body),
        stop,
        b.cancelled(),
        done,
    )
    .await;
    if why == Some(batch::Stop::ShuttingDown) {
        // Not an end: the batch stays in progress (with --batch-dir, to go on at the next start).
        return;
    }
    out.extend(answered);
    out.sort_unstable_by_key(|(i, _)| *i);
    let now = unix_now();
    b.finalizing(now);
    let mut files = Vec::new();
    let (output, errors) = if b.api == batch::Api::Anthropic {
        // One results file, every request's result in it.
        let data = batch::jsonl(out.iter().map(|(_, o)| o));
        let id = message_batch::results_id(&b.id);
        let name = format!("{}_results.jsonl", b.id);
        let purpose = message_batch::RESULTS_PURPOSE;
        let f = lock(&app.batches).keep(batch::File::with_id(id, name, purpose, now, data));
        files.push(f.clone());
        (Some(f.id.clone()), None)
    } else {
        let (good, bad): (Vec<_>, Vec<_>) = out.iter().map(|(_, o)| o).partition(|o| o.ok);
        let mut store = lock(&app.batches);
        let mut keep = |lines: Vec<&batch::Outcome>, what: &str| {
            (!lines.is_empty()).then(|| {
                let name = format!("{}_{what}.jsonl", b.id);
                let data = batch::jsonl(lines);
                // Named after the batch: finalizing again after a restart replaces it.
                let id = format!("file-{}-{what}", b.id);
                let f = store.keep(batch::File::with_id(id, name, "batch_output", now, data));
                files.push(f.clone());
                f.id.clone()
            })
        };
        (keep(good, "output"), keep(bad, "error"))
    };
    b.finish(why, output, errors, now);
    if let Some(disk) = app.disk.clone() {
        // The record says the batch ended only once its outputs are on disk: otherwise a
        // restart finalizes it again from the answers kept.
        let record = b.clone();
        let saved = flat(
            blocking(move || {
                files.iter().try_for_each(|f| disk.save_file(f))?;
                disk.save_batch(&record, None)
            })
            .await,
        );
        if let Err(e) = saved {
            tracing::warn!(
                "--batch-dir: cannot save the outputs of batch {}: {e:#}",
                b.id
            );
        }
    }
}

tokio::task_local! {
    /// Set while a batch line runs through its route ([`dispatch`]).
    static BATCH_LINE: ();
}

/// Added to a batch line's priority: its generations wait behind every client request's
/// (whose `priority` is an i32), in their own order among themselves.
const BATCH_PRIORITY: i64 = 1 << 32;

/// A batch line through the route a client's request takes (the batch's creator passed the key
/// check), its generations queued behind client requests'.
async fn dispatch(app: &Arc<App>, url: String, body: Bytes) -> batch::Answer {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body).map_err(|e| match e {}).boxed_unsync());
    let (name, result) = match req {
        Ok(req) => {
            BATCH_LINE
                .scope((), route(app, Method::POST, &url, req))
                .await
        }
        Err(e) => (
            "other",
            Err(ApiError::internal(format!("cannot build the request: {e}"))),
        ),
    };
    let resp = result.unwrap_or_else(|e| {
        // In the shape a client of that route reads (as [`handle`] gives it).
        let body = if url.starts_with(batch::MESSAGES) {
            messages::error_body(&e)
        } else {
            e.body()
        };
        error_response(&e, &body)
    });
    let status = resp.status().as_u16();
    app.metrics.request(name, status);
    let bytes = match resp.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(never) => match never {},
    };
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    batch::Answer { status, body }
}

/// `verdict run-batch`: a batch file's requests (any batchable routes) through the server's
/// routes, without listening, every line's answer written to `output` in input order (`-`:
/// stdin, stdout).
pub fn run_file(
    opts: ServeOptions,
    registry: Arc<PolicyRegistry>,
    loader: Loader,
    input: &std::path::Path,
    output: &std::path::Path,
) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let stdio = |p: &std::path::Path| p.as_os_str() == "-";
    let data = if stdio(input) {
        let mut d = Vec::new();
        std::io::stdin()
            .read_to_end(&mut d)
            .context("reading the batch from stdin")?;
        d
    } else {
        std::fs::read(input).with_context(|| format!("reading {}", input.display()))?
    };
    let lines = batch::parse_at_most(&Bytes::from(data), None, usize::MAX).map_err(|errors| {
        let list: Vec<String> = errors.iter().map(|e| format!("\n  {e}")).collect();
        anyhow::anyhow!("{}: not a batch file:{}", input.display(), list.concat())
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("verdict-batch")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    // The server's stored batches are not this run's to go on with.
    let opts = ServeOptions {
        batch_dir: None,
        ..opts
    };
    rt.block_on(async move {
        let app = App::new(opts, registry)?;
        let t0 = Instant::now();
        let served = tokio::task::spawn_blocking(loader)
            .await
            .context("the model loader panicked")?
            .context("cannot load the model")?;
        app.loaded(served);
        let total = lines.len();
        eprintln!(
            "verdict: model loaded in {:.1} s; running {total} requests",
            t0.elapsed().as_secs_f64()
        );
        let finished = std::sync::atomic::AtomicUsize::new(0);
        let progress = |_: usize, _: &batch::Outcome| {
            let n = finished.fetch_add(1, Ordering::Relaxed) + 1;
            if n * 10 / total != (n - 1) * 10 / total {
                eprintln!("verdict: {n}/{total} requests done");
            }
        };
        // Never cancelled (the sender lives to the end).
        let (_cancel, cancelled) = tokio::sync::watch::channel(false);
        let (mut out, _) = batch::run(
            batch::Api::OpenAi,
            lines.into_iter().enumerate().collect(),
            app.opts.workers,
            &app.batch_gate,
            |url, body| dispatch(&app, url, body),
            || None,
            cancelled,
            progress,
        )
        .await;
        out.sort_unstable_by_key(|(i, _)| *i);
        let data = batch::jsonl(out.iter().map(|(_, o)| o));
        if stdio(output) {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&data).context("writing to stdout")?;
            stdout.flush().context("writing to stdout")?;
        } else {
            crate::files::write_atomic(output, &data)?;
        }
        let failed = out.iter().filter(|(_, o)| !o.ok).count();
        eprintln!(
            "verdict: {total} requests in {:.1} s: {} answered, {failed} failed; answers in {}",
            t0.elapsed().as_secs_f64(),
            total - failed,
            output.display()
        );
        let app2 = app.clone();
        let _ = tokio::task::spawn_blocking(move || app2.pool.drain(Duration::from_secs(5))).await;
        Ok(())
    })
}

/// The 429 for a job the pool's queue has no room for.
fn at_capacity(f: super::pool::Full) -> ApiError {
    ApiError::overloaded(
        f.retry_after_s,
        format!(
            "the server is at capacity ({} requests waiting); retry later",
            f.queued
        ),
    )
}

/// A completion's text prompt as ids (special tokens parsed; BOS unless `add_special_tokens`
/// is false).
fn text_prompt(
    tokenizer: &Tokenizer,
    text: &str,
    framing: api::Framing,
) -> Result<Vec<u32>, ApiError> {
    framed(tokenizer, text, framing)
        .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize the prompt: {e:#}")))
}

/// Text as ids, special tokens parsed; the model's BOS added unless `add_special_tokens` is
/// false.
fn framed(tokenizer: &Tokenizer, text: &str, framing: api::Framing) -> anyhow::Result<Vec<u32>> {
    if framing.special_tokens {
        tokenizer.encode_prompt(text, true)
    } else {
        tokenizer.encode(text, true)
    }
}

/// Token ids sent by a client must be in the vocabulary; the error names `field[i]`.
fn check_ids(ids: &[u32], tokenizer: &Tokenizer, field: &str) -> Result<(), ApiError> {
    let vocab = tokenizer.vocab_size();
    match ids.iter().position(|&t| t as usize >= vocab) {
        Some(i) => Err(ApiError::invalid(
            format!("{field}[{i}]"),
            format!(
                "token id {} is outside the vocabulary (size {vocab})",
                ids[i]
            ),
        )),
        None => Ok(()),
    }
}

/// A chat request's prompt ids.
fn chat_prompt(served: &Served, p: &api::ParsedRequest) -> Result<Vec<u32>, ApiError> {
    chat_prompt_of(
        served,
        &p.messages,
        p.tools.as_ref(),
        (p.continue_final, p.framing),
        p.template_vars.as_ref(),
    )
}

/// A chat's prompt ids: the messages through the model's template, then tokenized.
fn chat_prompt_of(
    served: &Served,
    messages: &[api::ChatMessage],
    tools: Option<&Value>,
    (continue_final, framing): (bool, api::Framing),
    vars: Option<&serde_json::Map<String, Value>>,
) -> Result<Vec<u32>, ApiError> {
    let msgs: Vec<Message> = messages
        .iter()
        .map(|m| Message {
            tool_calls: m.tool_calls.clone(),
            tool_call_id: m.tool_call_id.clone(),
            ..Message::new(m.role.clone(), m.content.clone())
        })
        .collect();
    if tools.is_some() && !served.chat.takes_tools() {
        return Err(ApiError::invalid(
            "tools",
            "this model's chat template does not read a tools list, so it cannot be offered tools",
        ));
    }
    let rendered = served
        .chat
        .render_with_tools(&msgs, tools, framing.opens_turn(continue_final), vars)
        .map_err(|e| {
            ApiError::invalid(
                "messages",
                format!("the chat template rejected the messages: {e:#}"),
            )
        })?;
    // Continuing the final message: the conversation as written, cut right after that
    // message's text (before the template closes its turn).
    let text = match msgs.last().filter(|_| continue_final) {
        None => rendered,
        Some(last) => {
            let end = rendered
                .rfind(last.content.as_str())
                .filter(|_| !last.content.is_empty())
                .map(|at| at + last.content.len())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "continue_final_message",
                        "the final message cannot be continued: it is empty, or the chat template does not write its text as it is",
                    )
                })?;
            rendered[..end].to_string()
        }
    };
    framed(&served.tokenizer, &text, framing).map_err(|e| {
        ApiError::invalid(
            "messages",
            format!("cannot tokenize the conversation: {e:#}"),
        )
    })
}

/// `POST /detokenize` (vLLM's shape): `{"tokens": [...]}` to `{"prompt": text}`, special tokens
/// written out.
async fn detokenize(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let served = served_or_unavailable(app)?;
    let body = read_body(req, app.opts.max_body_bytes, "body").await?;
    let ids = api::parse_detokenize(&body)?;
    check_ids(&ids, &served.tokenizer, "tokens")?;
    let text = served
        .tokenizer
        .decode(&ids, false)
        .map_err(|e| ApiError::invalid("tokens", format!("cannot decode: {e:#}")))?;
    Ok(json_response(StatusCode::OK, &json!({"prompt": text})))
}

/// Turns a parsed request into an engine request: renders the chat, tokenizes, and checks
/// everything that can be checked before queueing (context length, policy and its parameters)
/// so that a bad request never waits in the queue for its 400.
fn prepare(app: &App, served: &Served, p: &ParsedRequest) -> Result<GenerateRequest, ApiError> {
    if p.priority != 0 && app.opts.scheduling == Scheduling::Fcfs {
        return Err(ApiError::invalid(
            "priority",
            "priority needs a server started with --scheduling-policy priority (this one serves requests in arrival order)",
        ));
    }
    let tokenizer = &*served.tokenizer;
    let engine = &served.engine;
    let (prompt, field) = match p.endpoint {
        Endpoint::Completions => match p.prompt.as_ref() {
            Some(PromptInput::Text(t)) => (text_prompt(tokenizer, t, p.framing)?, "prompt"),
            Some(PromptInput::Tokens(ids)) => {
                check_ids(ids, tokenizer, "prompt")?;
                (ids.clone(), "prompt")
            }
            None => {
                return Err(ApiError::invalid(
                    "prompt",
                    "missing required field `prompt`",
                ));
            }
        },
        Endpoint::Chat => (chat_prompt(served, p)?, "messages"),
    };
    // Fill-in-the-middle: prefix and suffix read as plain text (code, not markup), between the
    // model's FIM tokens; the middle ends at any of them too.
    let (prompt, mut stop_tokens) = match &p.suffix {
        None => (prompt, tokenizer.eos_ids().to_vec()),
        Some(suffix) => {
            let fim = tokenizer.fim().ok_or_else(|| {
                ApiError::invalid(
                    "suffix",
                    "this model's vocabulary has no fill-in-the-middle tokens (<|fim_prefix|>, <|fim_suffix|>, <|fim_middle|>), so it cannot complete between a prompt and a suffix",
                )
            })?;
            let text = |t: &str, what: &str| {
                tokenizer.encode(t, false).map_err(|e| {
                    ApiError::invalid(what, format!("cannot tokenize the {what}: {e:#}"))
                })
            };
            let prefix = match p.prompt.as_ref() {
                Some(PromptInput::Text(t)) => text(t, "prompt")?,
                _ => prompt,
            };
            let bos = tokenizer.bos_id().filter(|_| tokenizer.add_bos());
            let ids = fim.prompt(bos, &prefix, &text(suffix, "suffix")?);
            (ids, fim.stops)
        }
    };
    if p.ignore_eos {
        stop_tokens.clear();
    }
    check_ids(&p.stop_token_ids, tokenizer, "stop_token_ids")?;
    for &t in &p.stop_token_ids {
        if !stop_tokens.contains(&t) {
            stop_tokens.push(t);
        }
    }
    check_ids(&p.penalties.allowed, tokenizer, "allowed_token_ids")?;
    let mut penalties = p.penalties.clone();
    penalties.bad_words = sample::bad_words_ids(&p.bad_words, |w| tokenizer.encode(w, false))
        .map_err(|(i, e)| ApiError::invalid(format!("bad_words[{i}]"), e))?;
    let prediction = (p.prediction.as_deref())
        .map(|t| tokenizer.encode(t, false))
        .transpose()
        .map_err(|e| ApiError::invalid("prediction", format!("cannot tokenize: {e:#}")))?;
    let ctx = engine.max_context();
    // vLLM's truncate_prompt_tokens: the prompt's last N tokens (-1: all that leave room for
    // max_tokens, 16 when it is not given).
    let mut prompt = prompt;
    if let Some(keep) = p.truncate_prompt {
        let keep = match keep {
            Some(n) => n,
            None => {
                let reserve = p.max_tokens.unwrap_or(16).max(1);
                if reserve >= ctx {
                    return Err(ApiError::invalid(
                        "max_tokens",
                        format!(
                            "max_tokens = {reserve} leaves no room for a prompt in this model's context of {ctx}"
                        ),
                    )
                    .with_code("context_length_exceeded"));
                }
                ctx - reserve
            }
        };
        if prompt.len() > keep {
            prompt.drain(..prompt.len() - keep);
        }
    }
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            field,
            format!("{field} is empty (no tokens)"),
        ));
    }
    if prompt.len() >= ctx {
        return Err(ApiError::invalid(
            field,
            format!(
                "the prompt is {} tokens; this model's context holds {ctx}, and at least one must be left to generate",
                prompt.len()
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = ctx - prompt.len();
    let max_tokens = match p.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "max_tokens = {n} but the {field} ({} tokens) leaves room for {room} in this model's context of {ctx}",
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Some(n) => n,
        // The server's default (`--override-generation-config`), else OpenAI's: 16 for
        // completions, the rest of the context for chat; never more than the room.
        None => match api::default_max_tokens(&app.opts.generation_defaults) {
            Some(d) => room.min(d),
            None if p.endpoint == Endpoint::Completions => room.min(16),
            None => room,
        },
    };
    check_policy(app, p)?;
    let grammar = match &p.grammar {
        Some((field, spec)) => {
            let grammars = app
                .grammars
                .get_or_init(|| Grammars::new(tokenizer).map_err(|e| format!("{e:#}")))
                .as_ref()
                .map_err(|e| {
                    ApiError::invalid(*field, format!("no grammar with this model: {e}"))
                })?;
            // gpt-oss calls a function with a harmony message, not a JSON object.
            let harmony;
            let spec = match (*field, app.opts.reasoning) {
                ("tool_choice", Some(reasoning::Parser::GptOss)) => {
                    let special = |m: &str| {
                        tokenizer
                            .token_id(m)
                            .and_then(|id| tokenizer.token_kind(id))
                            .is_some_and(|k| k.is_special())
                    };
                    harmony = api::harmony_call_grammar(spec, special)
                        .map_err(|e| ApiError::invalid(*field, e))?;
                    &harmony
                }
                _ => spec,
            };
            let c = grammars
                .compile(spec, &stop_tokens)
                .map_err(|e| ApiError::invalid(*field, format!("{field}: {e}")))?;
            Some(c)
        }
        None => None,
    };
    Ok(GenerateRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_p: p.top_p,
            min_p: p.min_p,
            top_k: p.top_k,
        },
        seed: p.seed,
        stop_tokens,
        speculation: match &p.speculation {
            SpeculationChoice::Default => engine::Speculation::Default,
            SpeculationChoice::Off => engine::Speculation::Off,
            SpeculationChoice::Draft { draft, k } => engine::Speculation::Draft {
                drafter: draft.clone(),
                k: *k,
            },
        },
        policy: p.policy.clone(),
        policy_params: p.policy_params.clone(),
        logprobs: p.logprobs,
        // Scored for an echo's logprobs and for `prompt_logprobs`, with the more alternatives;
        // a request that only reads its prompt (`max_tokens: 0`) is a scoring one either way.
        prompt_logprobs: p
            .logprobs
            .filter(|_| p.echo)
            .max(p.prompt_logprobs)
            .or(Some(0).filter(|_| max_tokens == 0)),
        penalties,
        grammar,
        cache_salt: p.cache_salt.clone(),
        prediction,
        ..GenerateRequest::default()
    })
}

/// The field to name when a request's masks leave no token to generate
/// ([`sample::NoTokenAllowed`]): the narrowest one it set. `None` when it set none (then the
/// model's own row had no number in it: not the request's fault).
fn mask_field(p: &ParsedRequest) -> Option<&'static str> {
    if !p.penalties.allowed.is_empty() {
        Some("allowed_token_ids")
    } else if let Some((field, _)) = &p.grammar {
        Some(field)
    } else if !p.bad_words.is_empty() {
        Some("bad_words")
    } else {
        (p.penalties.min_tokens > 0).then_some("min_tokens")
    }
}

/// The policy must exist and each parameter must be one it declares, in range.
fn check_policy(app: &App, p: &ParsedRequest) -> Result<(), ApiError> {
    let spec = p.policy.as_deref().unwrap_or(&app.opts.default_policy);
    let handle = app
        .registry
        .resolve(spec)
        .map_err(|e| ApiError::invalid("policy", format!("{e:#}")).with_code("unknown_policy"))?;
    for (name, value) in &p.policy_params {
        handle
            .resolve_params(&[(name.clone(), *value)])
            .map_err(|e| {
                ApiError::invalid(format!("policy_params.{name}"), format!("{e:#}"))
                    .with_code("invalid_policy_param")
            })?;
    }
    Ok(())
}

struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    include_usage: bool,
    /// `stream_options.continuous_usage_stats`: every chunk carries its choice's usage so far.
    continuous_usage: bool,
    /// The request's number of alternatives per token; `None`: no logprobs asked.
    logprobs: Option<usize>,
    /// Choices: `n` for each prompt.
    n: usize,
    /// `n`: choices i * n.. answer the request's i-th prompt.
    per_prompt: usize,
    /// The request offered tools: replies are read for tool calls (a stream holds back what
    /// may be a call until the reply ends, [`tools::Holder`]).
    tools: bool,
    /// Chat replies' thinking goes to `reasoning_content`.
    reasoning: Option<reasoning::Reading>,
    /// vLLM's `return_token_ids`: each prompt's token ids (empty: not asked for); choices then
    /// carry their output's too.
    prompt_ids: Vec<Vec<u32>>,
}

/// The usage a streamed chunk carries with `continuous_usage_stats`.
fn usage_so_far(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn usage(o: &Outcome) -> Value {
    let mut u = usage_so_far(o.prompt_tokens, o.completion_tokens);
    u["prompt_tokens_details"] = json!({ "cached_tokens": o.cached_tokens });
    let s = &o.speculation;
    if let (Some(a), Some(r)) = (s.accepted_prediction_tokens, s.rejected_prediction_tokens) {
        u["completion_tokens_details"] = json!({
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": a, "rejected_prediction_tokens": r,
        });
    }
    u
}

impl ResponseMeta {
    /// The choice's `logprobs` for these tokens (null when the request asked for none).
    fn logprobs(&self, entries: &[TokenEntry]) -> Value {
        match (self.logprobs, self.endpoint) {
            (None, _) => Value::Null,
            (Some(n), Endpoint::Completions) => logprobs::completions_json(entries, n),
            (Some(_), Endpoint::Chat) => logprobs::chat_json(entries),
        }
    }

    /// `return_token_ids`: the token ids of choice `i`'s prompt.
    fn prompt_ids_of(&self, i: usize) -> Option<&Vec<u32>> {
        self.prompt_ids.get(i / self.per_prompt.max(1))
    }

    /// The whole (non-streamed) response; `choices` are all finished. `total`: the outcome of
    /// every generation (those `best_of` left out too).
    fn full(&self, choices: &[Choice], total: Option<Outcome>) -> Value {
        let outcomes: Vec<&Outcome> = choices.iter().filter_map(|c| c.outcome.as_ref()).collect();
        let json_choices: Vec<Value> = choices
            .iter()
            .zip(&outcomes)
            .enumerate()
            .map(|(i, (c, o))| {
                let lp = self.logprobs(&c.entries);
                let mut choice = match self.endpoint {
                    Endpoint::Completions => json!({
                        "index": i, "text": c.text, "logprobs": lp,
                        "finish_reason": o.finish_reason, "stop_reason": o.stop_reason(),
                    }),
                    Endpoint::Chat => {
                        let (message, finish) = self.message(&c.text, o.finish_reason);
                        json!({
                            "index": i, "message": message, "logprobs": lp,
                            "finish_reason": finish, "stop_reason": o.stop_reason(),
                        })
                    }
                };
                // vLLM's extensions: on each completions choice, its prompt's; chat's once,
                // beside the choices.
                if self.endpoint == Endpoint::Completions {
                    if let Some(p) = &c.prompt_logprobs {
                        choice["prompt_logprobs"] = p.clone();
                    }
                    if let Some(ids) = self.prompt_ids_of(i) {
                        choice["prompt_token_ids"] = json!(ids);
                    }
                }
                if !self.prompt_ids.is_empty() {
                    choice["token_ids"] = json!(o.token_ids);
                }
                choice
            })
            .collect();
        let mut response = json!({
            "id": self.id,
            "object": if self.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": json_choices,
            "usage": total.as_ref().map_or(Value::Null, usage),
            "speculation": total.map(|t| t.speculation),
        });
        if self.endpoint == Endpoint::Chat {
            if let Some(p) = choices.first().and_then(|c| c.prompt_logprobs.clone()) {
                response["prompt_logprobs"] = p;
            }
            if let Some(ids) = self.prompt_ids.first() {
                response["prompt_token_ids"] = json!(ids);
            }
        }
        response
    }

    /// A chat reply's message and finish reason: its thinking apart when the server reads it,
    /// then, with tools offered, the tool calls the answer makes (finish reason "tool_calls"),
    /// else its text.
    fn message(&self, text: &str, finish: &'static str) -> (Value, &'static str) {
        let Some(parser) = self.reasoning else {
            return self.answer(text, finish);
        };
        let (thought, answer) = reasoning::split(parser, text);
        let (mut m, finish) = self.answer(&answer, finish);
        m["reasoning_content"] = json!(thought);
        (m, finish)
    }

    /// [`ResponseMeta::message`] of the answer alone.
    fn answer(&self, text: &str, finish: &'static str) -> (Value, &'static str) {
        match self.tools.then(|| tools::parse(text)).flatten() {
            Some((content, calls)) => (
                json!({"role": "assistant", "content": content, "tool_calls": calls}),
                "tool_calls",
            ),
            None => (json!({"role": "assistant", "content": text}), finish),
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// A whole streamed chat reply to a request with tools, as one chunk: its text, or its tool
    /// calls (each with its `index`, as OpenAI streams them) and the finish reason to use.
    fn tool_chunk(
        &self,
        index: usize,
        text: &str,
        entries: &[TokenEntry],
        finish: &'static str,
    ) -> (Value, &'static str) {
        // The thinking has streamed already: this is the answer.
        let (mut message, finish) = self.answer(text, finish);
        if let Some(calls) = message.get_mut("tool_calls").and_then(Value::as_array_mut) {
            for (j, c) in calls.iter_mut().enumerate() {
                c["index"] = json!(j);
            }
        }
        let lp = self.logprobs(entries);
        (
            self.chunk(json!([{
                "index": index, "delta": message, "logprobs": lp, "finish_reason": null,
            }])),
            finish,
        )
    }

    /// New text of choice `index` (`first`: its first chunk, which names the chat role), of
    /// its answer or (chat) its thinking.
    fn delta_chunk(
        &self,
        index: usize,
        part: reasoning::Part,
        text: &str,
        entries: &[TokenEntry],
        first: bool,
    ) -> Value {
        let lp = self.logprobs(entries);
        match self.endpoint {
            Endpoint::Completions => self.chunk(json!([{
                "index": index, "text": text, "logprobs": lp, "finish_reason": null,
            }])),
            Endpoint::Chat => {
                let field = match part {
                    reasoning::Part::Content => "content",
                    reasoning::Part::Reasoning => "reasoning_content",
                };
                let mut delta = json!({ field: text });
                if first {
                    delta["role"] = json!("assistant");
                }
                self.chunk(json!([{
                    "index": index, "delta": delta, "logprobs": lp, "finish_reason": null,
                }]))
            }
        }
    }

    /// Choice `index`'s finishing chunk. The last choice to finish (`total`: every choice's
    /// outcome summed) also carries the usage and speculation statistics, and with
    /// `include_usage` a usage-only chunk follows.
    fn final_chunks(
        &self,
        index: usize,
        o: &Outcome,
        first: bool,
        total: Option<&Outcome>,
    ) -> Vec<Value> {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": index, "text": "", "logprobs": null, "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason(),
            }),
            Endpoint::Chat => json!({
                "index": index,
                "delta": if first { json!({"role": "assistant", "content": ""}) } else { json!({}) },
                "logprobs": null,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason(),
            }),
        };
        let mut last = self.chunk(json!([choice]));
        let Some(total) = total else {
            if self.continuous_usage {
                last["usage"] = usage_so_far(o.prompt_tokens, o.completion_tokens);
            }
            return vec![last];
        };
        last["usage"] = usage(total);
        last["speculation"] = serde_json::to_value(&total.speculation).unwrap_or(Value::Null);
        let mut out = vec![last];
        if self.include_usage {
            let mut u = self.chunk(json!([]));
            u["usage"] = usage(total);
            out.push(u);
        }
        out
    }
}

fn sse_data(v: &Value) -> Bytes {
    let mut s = String::from("data: ");
    s.push_str(&v.to_string());
    s.push_str("\n\n");
    Bytes::from(s)
}

/// Server-sent events from the generation's channel, ending in `data: [DONE]`. Dropping this
/// body (the client went away) closes the channel, which stops the generation.
/// `early`: events that arrived before the response started, sent first.
/// What keeps a finished chat completion (`store: true`): given the whole object.
type Keeper = Box<dyn FnOnce(Value) + Send + Sync>;

fn sse_response(
    meta: ResponseMeta,
    early: VecDeque<(usize, Event)>,
    rx: UnboundedReceiver<(usize, Event)>,
    keep: Option<Keeper>,
) -> Response<Body> {
    struct S {
        /// With `store`: each choice as a whole, and what keeps the whole answer at the end.
        kept: Vec<Choice>,
        keep: Option<Keeper>,
        meta: ResponseMeta,
        early: VecDeque<(usize, Event)>,
        rx: UnboundedReceiver<(usize, Event)>,
        /// Per choice: no chunk sent yet.
        first: Vec<bool>,
        outcomes: Vec<Option<Outcome>>,
        /// Per choice, with tools: what is held back from the client (see [`tools::Holder`]).
        held: Vec<tools::Holder<TokenEntry>>,
        /// Per choice, with a reasoning parser: its thinking apart from its answer.
        split: Vec<Option<reasoning::Splitter<TokenEntry>>>,
        /// Per choice: its prompt's tokens and those generated so far.
        tokens: Vec<(usize, usize)>,
        /// Per choice (`return_token_ids`): generated tokens not sent yet, and how many came
        /// in `Progress` events (the outcome holds the rest).
        ids: Vec<Vec<u32>>,
        ids_seen: Vec<usize>,
        done: bool,
    }
    impl S {
        /// vLLM's `return_token_ids` on a chunk of choice `i`: the tokens since its last chunk,
        /// and with its first chunk its prompt's.
        fn tag(&mut self, i: usize, chunk: &mut Value) {
            if self.meta.prompt_ids.is_empty() {
                return;
            }
            chunk["choices"][0]["token_ids"] = json!(std::mem::take(&mut self.ids[i]));
            if self.first[i] {
                let prompt = json!(self.meta.prompt_ids_of(i));
                match self.meta.endpoint {
                    Endpoint::Completions => chunk["choices"][0]["prompt_token_ids"] = prompt,
                    Endpoint::Chat => chunk["prompt_token_ids"] = prompt,
                }
            }
        }

        /// The chunks for choice `i`'s new pieces: thinking as it comes, the answer through
        /// the tool-call holder when tools were offered.
        fn send(
            &mut self,
            i: usize,
            pieces: Vec<(reasoning::Part, String, Vec<TokenEntry>)>,
        ) -> Vec<u8> {
            let mut out = Vec::new();
            for (part, text, entries) in pieces {
                let (text, entries) = match part {
                    reasoning::Part::Content if self.meta.tools => {
                        match self.held[i].push(&text, entries) {
                            Some(sent) => sent,
                            None => continue,
                        }
                    }
                    _ => (text, entries),
                };
                let mut chunk = self
                    .meta
                    .delta_chunk(i, part, &text, &entries, self.first[i]);
                if self.meta.continuous_usage {
                    let (prompt, completion) = self.tokens[i];
                    chunk["usage"] = usage_so_far(prompt, completion);
                }
                self.tag(i, &mut chunk);
                out.extend_from_slice(&sse_data(&chunk));
                self.first[i] = false;
            }
            out
        }
    }
    let n = meta.n;
    let state = S {
        kept: (0..n).map(|_| Choice::default()).collect(),
        keep,
        split: (0..n)
            .map(|_| meta.reasoning.map(reasoning::Splitter::new))
            .collect(),
        meta,
        early,
        rx,
        first: vec![true; n],
        outcomes: vec![None; n],
        held: (0..n).map(|_| tools::Holder::default()).collect(),
        tokens: vec![(0, 0); n],
        ids: vec![Vec::new(); n],
        ids_seen: vec![0; n],
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let bytes = loop {
            let next = match s.early.pop_front() {
                Some(e) => Some(e),
                None => s.rx.recv().await,
            };
            match next {
                Some((i, Event::Delta(d, e))) => {
                    if s.keep.is_some() {
                        s.kept[i].text.push_str(&d);
                        s.kept[i].entries.extend(e.iter().cloned());
                    }
                    let pieces = match &mut s.split[i] {
                        Some(split) => split.push(&d, e),
                        None => vec![(reasoning::Part::Content, d, e)],
                    };
                    let out = s.send(i, pieces);
                    if out.is_empty() {
                        continue;
                    }
                    break Bytes::from(out);
                }
                Some((_, Event::Started | Event::Prefilled)) => continue,
                Some((
                    i,
                    Event::Progress {
                        prompt,
                        completion,
                        tokens,
                    },
                )) => {
                    s.tokens[i] = (prompt, completion);
                    s.ids_seen[i] += tokens.len();
                    s.ids[i].extend(tokens);
                    continue;
                }
                // Refused with a stream (`api::parse`).
                Some((_, Event::PromptLogprobs(_))) => continue,
                Some((i, Event::Done(o))) => {
                    let mut o = *o;
                    if s.keep.is_some() {
                        s.kept[i].outcome = Some(o.clone());
                    }
                    let unseen = o.token_ids.get(s.ids_seen[i]..).unwrap_or_default();
                    s.ids[i].extend_from_slice(unseen);
                    let rest = s.split[i]
                        .as_mut()
                        .map(|sp| sp.finish())
                        .unwrap_or_default();
                    let mut out = s.send(i, rest);
                    if s.meta.tools {
                        let (text, entries) = s.held[i].finish();
                        if !text.is_empty() || !entries.is_empty() {
                            let (mut chunk, finish) =
                                s.meta.tool_chunk(i, &text, &entries, o.finish_reason);
                            o.finish_reason = finish;
                            s.tag(i, &mut chunk);
                            out.extend_from_slice(&sse_data(&chunk));
                            s.first[i] = false;
                        }
                    }
                    s.outcomes[i] = Some(o.clone());
                    let finished: Vec<&Outcome> = s.outcomes.iter().flatten().collect();
                    let total = (finished.len() == s.meta.n)
                        .then(|| Outcome::total(&finished, s.meta.per_prompt))
                        .flatten();
                    let mut chunks = s.meta.final_chunks(i, &o, s.first[i], total.as_ref());
                    if let Some(c) = chunks.first_mut() {
                        s.tag(i, c);
                    }
                    for c in chunks {
                        out.extend_from_slice(&sse_data(&c));
                    }
                    s.first[i] = false;
                    if total.is_some() {
                        out.extend_from_slice(b"data: [DONE]\n\n");
                        s.done = true;
                        if let Some(keep) = s.keep.take() {
                            keep(s.meta.full(&s.kept, total));
                        }
                    }
                    break Bytes::from(out);
                }
                Some((_, Event::Failed(e))) => {
                    let mut out = sse_data(&e.body()).to_vec();
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    s.done = true;
                    break Bytes::from(out);
                }
                None => {
                    let e = ApiError::internal("the generation worker stopped unexpectedly");
                    let mut out = sse_data(&e.body()).to_vec();
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    s.done = true;
                    break Bytes::from(out);
                }
            }
        };
        Some((Ok::<_, Infallible>(Frame::data(bytes)), s))
    });
    event_stream(StreamBody::new(stream))
}

/// A server-sent-events response around `body`; proxies are told not to buffer it.
fn event_stream<B>(body: B) -> Response<Body>
where
    B: hyper::body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    let mut r = Response::new(BodyExt::boxed(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// With API keys set, every route but the probes (`/health`, `/ready`) and `/metrics` needs
/// one, as `Authorization: Bearer <key>` or `x-api-key: <key>`. The policy admin routes with an admin token set take that token instead (a client
/// sends one `Authorization` header).
fn check_api_key<B>(
    app: &App,
    method: &Method,
    path: &str,
    req: &Request<B>,
) -> Result<(), ApiError> {
    let Some(keys) = &app.opts.api_keys else {
        return Ok(());
    };
    let open = OPEN_ROUTES.contains(&path);
    let admin = (path.starts_with("/v1/policies/")
        && matches!(*method, Method::PUT | Method::DELETE)
        || LORA_ROUTES.contains(&path))
        && app.opts.admin_token.is_some();
    if open || admin {
        return Ok(());
    }
    // Anthropic's clients send the key as `x-api-key`.
    if let Some(k) = req.headers().get("x-api-key") {
        return if keys.accepts_key(k.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized("the API key is wrong"))
        };
    }
    bearer(
        keys,
        req,
        "this server needs an API key: send `Authorization: Bearer <key>`",
        "the API key is wrong",
    )
}

/// Checks the request's `Authorization: Bearer` against `tokens`; the error says whether the
/// header was missing or its token wrong.
fn bearer<B>(
    tokens: &Tokens,
    req: &Request<B>,
    missing: &str,
    wrong: &str,
) -> Result<(), ApiError> {
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if tokens.accepts(h) {
        Ok(())
    } else if h.is_none() {
        Err(ApiError::unauthorized(missing))
    } else {
        Err(ApiError::unauthorized(wrong))
    }
}

// ---- LoRA modules while the server runs ----------------------------------------------------

/// vLLM's routes that add and remove LoRA modules (`--allow-lora-loading`).
const LORA_ROUTES: [&str; 2] = ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"];

/// The admin check, the switch, the loaded engine, and the body's `lora_name` (and the
/// body), for both LoRA routes.
async fn lora_request(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<(Arc<Served>, String, serde_json::Map<String, Value>), ApiError> {
    require_admin(app, &req)?;
    if !app.opts.allow_lora_loading {
        return Err(ApiError::invalid(
            "lora_name",
            "loading LoRA adapters while the server runs is off: start it with --allow-lora-loading",
        )
        .with_status(StatusCode::FORBIDDEN)
        .with_code("lora_loading_off"));
    }
    let served = served_or_unavailable(app)?;
    let body = api::json_object(&read_body(req, app.opts.max_body_bytes, "body").await?)?;
    let name = match body.get("lora_name") {
        Some(Value::String(n)) if !n.trim().is_empty() => n.clone(),
        Some(v) => {
            return Err(ApiError::invalid(
                "lora_name",
                format!("`lora_name` must be a non-blank string, got {v}"),
            ));
        }
        None => return Err(ApiError::invalid("lora_name", "`lora_name` is required")),
    };
    Ok((served, name, body))
}

/// `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}`: reads the adapter, builds its
/// engine, and serves it under that name. The name must be new (vLLM's rule: unload first).
async fn load_lora_adapter(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (served, name, body) = lora_request(app, req).await?;
    let path = match body.get("lora_path") {
        Some(Value::String(p)) if !p.is_empty() => std::path::PathBuf::from(p),
        Some(v) => {
            return Err(ApiError::invalid(
                "lora_path",
                format!("`lora_path` must be a path, got {v}"),
            ));
        }
        None => return Err(ApiError::invalid("lora_path", "`lora_path` is required")),
    };
    if name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ApiError::invalid(
            "lora_name",
            format!("the name {name:?} has spaces or control characters"),
        ));
    }
    let taken =
        |modules: &[Module]| is_base_name(app, &name) || modules.iter().any(|m| m.name == name);
    if taken(&lock_read(&served.modules)) {
        return Err(ApiError::invalid(
            "lora_name",
            format!("the model `{name}` is already served (unload it first)"),
        )
        .with_code("lora_name_taken"));
    }
    let adapt_served = served.clone();
    let p = path.clone();
    let engine = blocking(move || -> Result<Engine, String> {
        let adapt = adapt_served
            .adapt
            .as_ref()
            .ok_or("this server cannot adapt its target")?;
        let adapter = crate::models::LoraAdapter::load(&p, 1.0).map_err(|e| e.to_string())?;
        adapt(&adapter).map_err(|e| format!("{e:#}"))
    })
    .await?
    .map_err(|e| ApiError::invalid("lora_path", e).with_code("invalid_lora_adapter"))?;
    {
        let mut modules = served.modules.write().unwrap_or_else(|p| p.into_inner());
        // Another load of the same name may have finished meanwhile.
        if taken(&modules) {
            return Err(ApiError::invalid(
                "lora_name",
                format!("the model `{name}` is already served (unload it first)"),
            )
            .with_code("lora_name_taken"));
        }
        modules.push(Module {
            name: name.clone(),
            root: path.clone(),
            engine,
        });
    }
    tracing::info!("LoRA module `{name}` loaded from {}", path.display());
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "loaded", "lora_name": name, "lora_path": path.display().to_string()}),
    ))
}

/// `POST /v1/unload_lora_adapter` `{"lora_name"}`: requests stop naming it; the ones running
/// finish on the engine they hold.
async fn unload_lora_adapter(
    app: &Arc<App>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (served, name, _) = lora_request(app, req).await?;
    let removed = {
        let mut modules = served.modules.write().unwrap_or_else(|p| p.into_inner());
        let before = modules.len();
        modules.retain(|m| m.name != name);
        modules.len() < before
    };
    if !removed {
        return Err(
            ApiError::invalid("lora_name", format!("no LoRA module `{name}` is loaded"))
                .with_status(StatusCode::NOT_FOUND)
                .with_code("model_not_found"),
        );
    }
    tracing::info!("LoRA module `{name}` unloaded");
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "unloaded", "lora_name": name}),
    ))
}

// ---- policy management -------------------------------------------------------------------

/// The admin routes need the admin token when one is set; without one, an API key when those
/// are set (checked before routing); else they are open.
fn require_admin<B>(app: &App, req: &Request<B>) -> Result<(), ApiError> {
    match &app.opts.admin_token {
        None => Ok(()),
        Some(t) => bearer(
            t,
            req,
            "this route needs `Authorization: Bearer <admin token>`",
            "the admin token is wrong",
        ),
    }
}

/// A [`blocking`] task's own result, with the task's failure as one more error.
fn flat<T>(r: Result<anyhow::Result<T>, ApiError>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{}", e.message))?
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("background task failed: {e}")))
}

async fn list_policies(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let registry = app.registry.clone();
    let list = blocking(move || registry.list()).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "default": app.opts.default_policy, "data": list}),
    ))
}

async fn get_policy(app: &Arc<App>, name: String) -> Result<Response<Body>, ApiError> {
    let registry = app.registry.clone();
    let list = blocking(move || registry.list()).await?;
    let base = name.split('@').next().unwrap_or_default();
    match list.into_iter().find(|l| l.name == base) {
        Some(l) => Ok(json_response(
            StatusCode::OK,
            &serde_json::to_value(l).unwrap_or(Value::Null),
        )),
        None => {
            Err(ApiError::not_found(format!("unknown policy `{name}`")).with_code("unknown_policy"))
        }
    }
}

async fn put_policy(
    app: &Arc<App>,
    name: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, &req)?;
    if name.contains('@') {
        return Err(ApiError::invalid(
            "name",
            "PUT /v1/policies/{name} takes a bare name; the version comes from the component's info",
        ));
    }
    let wasm = read_body(req, app.opts.max_policy_bytes, "body").await?;
    if wasm.is_empty() {
        return Err(ApiError::invalid(
            "body",
            "the body must be a WebAssembly component (got 0 bytes)",
        ));
    }
    let registry = app.registry.clone();
    let n = name.clone();
    let had = blocking({
        let registry = registry.clone();
        let n = n.clone();
        move || registry.resolve(&n).ok().map(|h| h.version().to_string())
    })
    .await?;
    let handle = blocking(move || registry.register(Some(&n), &wasm))
        .await?
        .map_err(|e| {
            let msg = format!("{e:#}");
            if msg.contains("built-in policy name") {
                ApiError::invalid("name", msg)
                    .with_status(StatusCode::CONFLICT)
                    .with_code("builtin_policy")
            } else if msg.contains("invalid policy name") {
                ApiError::invalid("name", msg)
            } else {
                ApiError::invalid("body", format!("the component was rejected: {msg}"))
                    .with_code("invalid_policy")
            }
        })?;
    app.metrics.policy_swaps.inc();
    tracing::info!("policy `{name}` is now version {}", handle.version());
    Ok(json_response(
        if had.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        },
        &json!({
            "name": name,
            "version": handle.version(),
            "sha256": handle.sha256(),
            "previous": had,
            "info": handle.info(),
        }),
    ))
}

async fn delete_policy(
    app: &Arc<App>,
    name: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    require_admin(app, &req)?;
    let registry = app.registry.clone();
    let n = name.clone();
    blocking(move || registry.remove(&n)).await?.map_err(|e| {
        let msg = format!("{e:#}");
        if msg.contains("built-in") {
            ApiError::invalid("name", msg)
                .with_status(StatusCode::CONFLICT)
                .with_code("builtin_policy")
        } else if msg.contains("unknown policy") || msg.contains("has no version") {
            ApiError::invalid("name", msg)
                .with_status(StatusCode::NOT_FOUND)
                .with_code("unknown_policy")
        } else {
            ApiError::invalid("name", msg)
        }
    })?;
    app.metrics.policy_swaps.inc();
    Ok(json_response(StatusCode::OK, &json!({"deleted": name})))
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("judge%400.2.0"), "judge@0.2.0");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode("a%zz"), "a%zz");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
