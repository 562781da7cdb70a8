//! Models: GGUF and safetensors loading, the llama/qwen2 transformer with a truncatable KV cache,
//! the tokenizer and chat template. Knows nothing of drafting, policies or HTTP.

pub mod chat;
pub mod tokenizer;
