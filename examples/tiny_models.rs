//! Writes the tiny random models of `verdict::models::testing::peer_specs()` into a directory,
//! one `NAME.gguf` each, for `scripts/make-fixtures.py peer` to run llama.cpp on. The files are
//! the same bytes every time (seeded weights), so tests regenerate them instead of keeping them.
//! LoRA adapters of some (`testing::peer_loras`) are `lora-BASE.gguf`.
//! `--bench` writes only `gpt-oss-bench.gguf`, gpt-oss's layout at a small scale
//! (`testing::gpt_oss_bench_spec`), for `bench/cpu-vs-llamacpp --gguf`.
//!
//!   cargo run --example tiny_models -- DIR [--bench]

use anyhow::{Context, Result};
use std::path::PathBuf;
use verdict::models::testing::{
    gpt_oss_bench_spec, peer_loras, peer_spec, peer_specs, pre_tokenizer_specs, write_tiny_gguf,
    write_tiny_lora_gguf,
};

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: tiny_models DIR")?);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if std::env::args().nth(2).as_deref() == Some("--bench") {
        let path = dir.join("gpt-oss-bench.gguf");
        write_tiny_gguf(&path, &gpt_oss_bench_spec())?;
        println!("{}", path.display());
        return Ok(());
    }
    for (name, spec) in peer_specs() {
        let path = dir.join(format!("{name}.gguf"));
        write_tiny_gguf(&path, &spec)?;
        println!("{}", path.display());
    }
    // LoRA adapters of some of them, `lora-BASE.gguf`.
    for (base, lora) in peer_loras() {
        let spec = peer_spec(base).context("a LoRA's base is a peer spec")?;
        let path = dir.join(format!("lora-{base}.gguf"));
        write_tiny_lora_gguf(&path, &spec, &lora)?;
        println!("{}", path.display());
    }
    // Tokenizers alone: one file per pre-tokenizer, `pre-NAME.gguf`.
    for (name, spec) in pre_tokenizer_specs() {
        let path = dir.join(format!("pre-{name}.gguf"));
        write_tiny_gguf(&path, &spec)?;
        println!("{}", path.display());
    }
    Ok(())
}
