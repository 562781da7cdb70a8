//! `verdict run-batch`: a JSONL file of OpenAI requests run offline (vLLM's `run_batch`), with
//! the model flags of `verdict serve`.

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The requests: one JSON object per line, `{"custom_id", "method": "POST", "url", "body"}`
    /// (OpenAI's batch input format; `url` one of /v1/completions, /v1/chat/completions,
    /// /v1/embeddings, /v1/responses, /v1/score, /v1/rerank). `-`: stdin.
    #[arg(short = 'i', long = "input-file", value_name = "FILE")]
    pub input: PathBuf,
    /// Where the answers go, one line per request in input order: `{"id", "custom_id",
    /// "response": {"status_code", "request_id", "body"}, "error"}`. `-`: stdout.
    #[arg(short = 'o', long = "output-file", value_name = "FILE")]
    pub output: PathBuf,
    /// The model, drafter, policy and sampling flags of `verdict serve` (its network and TLS
    /// flags, `--batch-dir` and the `--max-file-*` limits do not apply; nor does the Batch API's
    /// 50,000-request limit).
    #[command(flatten)]
    pub serve: crate::cli::serve::ServeArgs,
}

pub fn run(args: Args) -> Result<()> {
    let (opts, registry, loader) = crate::cli::serve::setup(args.serve)?;
    crate::serve::http::run_file(opts, registry, loader, &args.input, &args.output)
}
