//! Writes a random LoRA adapter (llama.cpp's GGUF form) for a GGUF model: A and B for each
//! projection named, at the model's shapes. Speed runs use it (`bench/lora-overhead`): an
//! adapter's cost depends on its rank and the projections it updates, not on its values.
//!
//!   cargo run --release --example random_lora -- MODEL.gguf OUT.gguf [RANK] [TARGETS]
//!
//! TARGETS: GGUF names without the layer, comma separated (default: every projection of a dense
//! llama-like layer, PEFT's "all-linear": attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down).

use anyhow::{Context, Result};
use std::path::PathBuf;
use verdict::models::testing::{TinyLora, write_random_lora_for};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: random_lora MODEL.gguf OUT.gguf [RANK] [TARGETS]";
    let model = PathBuf::from(args.next().context(usage)?);
    let out = PathBuf::from(args.next().context(usage)?);
    let rank: usize = match args.next() {
        Some(r) => r.parse().with_context(|| format!("RANK {r:?}"))?,
        None => 16,
    };
    let targets = args
        .next()
        .unwrap_or_else(|| "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down".to_string());
    // TinyLora keeps &'static names: a one-off leak in a one-shot tool.
    let targets: Vec<&'static str> = targets
        .split(',')
        .map(|t| &*Box::leak(t.trim().to_string().into_boxed_str()))
        .collect();
    let lora = TinyLora {
        rank,
        alpha: 2.0 * rank as f32,
        targets,
        seed: 1,
    };
    write_random_lora_for(&model, &out, &lora)?;
    println!("{}", out.display());
    Ok(())
}
