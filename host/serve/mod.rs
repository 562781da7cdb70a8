//! Serve: the OpenAI-compatible HTTP server (hyper 1 + tokio). Talks to the engine and, for the
//! admin routes, to the policy registry; never to models directly.
//!
//! - [`api`]: request parsing and validation (every error names its field).
//! - [`http`]: routes, responses (JSON and server-sent events), policy management, drain.
//! - [`responses`]: OpenAI's Responses API as a chat request, its output items and typed
//!   stream events, and the store behind `previous_response_id` and `input_items`.
//! - [`chat_store`]: chat completions kept with `store: true`, listed, read, updated, deleted.
//! - [`conversations`]: OpenAI's Conversations API: item lists a response reads as its
//!   context and adds its turn to, one response at a time.
//! - [`background`]: background responses (`background: true`): polled, cancelled, their
//!   streams read again.
//! - [`messages`]: Anthropic's Messages API as a chat request, its content blocks and stream
//!   events, and its error shape.
//! - [`batch`]: OpenAI's Batch API (`/v1/files`, `/v1/batches`) and `verdict run-batch`: JSONL
//!   files of requests, each line run through its route in the server.
//! - [`message_batch`]: Anthropic's Message Batches API (`/v1/messages/batches`) on the same
//!   runner and store.
//! - [`embeddings`]: `/v1/embeddings`, the target's pooled hidden states in OpenAI's shape.
//! - [`kept`]: the bounded, oldest-out map behind the stored responses and chat completions.
//! - [`generate`]: one request's generation on a worker thread (stop strings, cancellation).
//! - [`logprobs`]: per-token logprobs lined up with the emitted text, and their JSON shapes.
//! - [`reasoning`]: a reasoning model's `<think>` block apart from its answer.
//! - [`pool`]: the generation worker threads and the bounded queue behind 429.
//! - [`metrics`]: Prometheus metrics.
//! - [`auth`]: the API keys and the admin token (bearer tokens, constant-time compare).
//! - [`error`]: OpenAI-style error bodies.
//!
//! Policy versions: a request resolves its policy once, when it starts; an upload or delete
//! while it runs does not affect it, and every request that starts afterwards gets the new
//! version.

pub mod api;
pub mod auth;
pub mod background;
pub mod batch;
pub mod chat_store;
pub mod conversations;
pub mod embeddings;
pub mod error;
pub mod generate;
pub mod http;
pub mod kept;
pub mod logprobs;
pub mod message_batch;
pub mod messages;
pub mod metrics;
pub mod pool;
pub mod reasoning;
pub mod responses;
pub mod stop;
pub mod tls;
pub mod tools;

pub use auth::Tokens;
pub use error::ApiError;
pub use http::{Adapt, Loader, Module, ServeOptions, Served, run};
