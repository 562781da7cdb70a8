//! verdict: a speculative-decoding LLM server whose acceptance policies are WebAssembly
//! components. See ARCHITECTURE.md for the codemap; the modules follow one speculation step:
//!
//! `models` (weights, KV caches, tokenizer) -> `draft` (propose k tokens) -> `verify` (one target
//! forward, per-position features) -> `decide` (the policy host calls the wasm policy) ->
//! `engine` (commit, rollback, the loop) -> `serve` (HTTP).

pub mod cli;
pub mod decide;
pub mod draft;
pub mod engine;
pub mod files;
pub mod judge;
pub mod models;
pub mod sample;
pub mod serve;
pub mod verify;
