//! Models: GGUF and safetensors loading, the llama/qwen2 transformer with a truncatable KV cache,
//! the tokenizer and chat template. Knows nothing of drafting, policies or HTTP.
//!
//! - [`gguf`]: open a GGUF file, read its metadata into a [`ModelConfig`], with errors that name
//!   the file and the reason.
//! - [`transformer`]: [`Model`] (shared, quantized weights) and [`Session`] (one sequence's KV
//!   cache; `forward`, `truncate` for speculation rollback).
//! - [`kv_cache`]: the preallocated, length-truncated KV cache behind a session.
//! - [`shard`]: tensor parallelism: a model split over ranks (Megatron layout) and the
//!   communicator that sums their partial outputs.
//! - [`synth`]: random weights at a real layout (GPU benchmarks without carrying weights).
//! - [`batch`]: forwards of concurrent sessions run as one batched forward (same logits).
//! - [`testing`]: tiny random models (GGUF and safetensors) for tests and benches.
//! - [`tokenizer`]: the GGUF's byte-level BPE tokenizer, ids equal to llama.cpp's.
//! - [`chat`]: the GGUF's chat template, rendered as Hugging Face renders it.

mod attention;
pub mod batch;
pub mod chat;
pub mod error;
pub mod gguf;
pub mod kv_cache;
mod requant;
pub mod safetensors;
pub mod shard;
pub mod synth;
pub mod testing;
pub mod tokenizer;
pub mod transformer;

pub use batch::BatchStats;
pub use error::{ModelError, Result};
pub use gguf::{Arch, GgufFile, ModelConfig, RopeStyle};
pub use transformer::{BatchItem, Forward, Model, Rows, Session, forward_batch};
