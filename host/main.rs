use std::process::ExitCode;

use clap::Parser;

/// verdict: speculative decoding with acceptance policies as WebAssembly components.
#[derive(Parser)]
#[command(name = "verdict", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Generate text from a prompt (optionally speculative); text on stdout.
    Generate(verdict::cli::generate::Args),
    /// Acceptance policies: list, check, add, remove, new, replay, bench.
    Policy(verdict::cli::policy::PolicyArgs),
    /// The OpenAI-compatible HTTP server (completions, chat, policy management, metrics).
    Serve(verdict::cli::serve::ServeArgs),
    /// Run a batch file of OpenAI requests (JSONL, the Batch API's format) offline, answers to a
    /// file (vLLM's run_batch).
    RunBatch(verdict::cli::batch::Args),
    /// Benchmarks, measured side by side in one run (results go to BENCHMARKS.md).
    #[command(subcommand)]
    Bench(verdict::cli::bench::BenchCommand),
    /// Quality and speed of policies on HumanEval (tests executed).
    #[command(subcommand)]
    Eval(verdict::cli::eval::EvalCommand),
    /// Judge heads: mine labels, train a head.
    #[command(subcommand)]
    Judge(verdict::cli::judge::JudgeCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (serve, log_requests) = match &cli.command {
        Command::Serve(a) => (true, !a.disable_log_requests),
        _ => (false, false),
    };
    init_logging(serve, log_requests);
    let result = match cli.command {
        Command::Generate(args) => verdict::cli::generate::run(args),
        Command::Policy(args) => verdict::cli::policy::run(args),
        Command::Serve(args) => verdict::cli::serve::run(args),
        Command::RunBatch(args) => verdict::cli::batch::run(args),
        Command::Bench(cmd) => verdict::cli::bench::run(cmd),
        Command::Judge(cmd) => verdict::cli::judge::run(cmd),
        Command::Eval(cmd) => verdict::cli::eval::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain: "loading x.gguf: reading header: ...".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines on stderr: warnings (a policy artifact discarded, structured outputs off for a
/// model, a prompt-cache failure) and, for `serve`, verdict's own info lines (the model loaded,
/// its KV cache, LoRA modules, policy swaps). `RUST_LOG` overrides, e.g. `RUST_LOG=debug`.
fn init_logging(serve: bool, log_requests: bool) {
    use std::io::IsTerminal;
    let default = match (serve, log_requests) {
        (true, true) => "warn,verdict=info",
        // Each request's lines (`verdict::requests`) off, verdict's other info lines on.
        (true, false) => "warn,verdict=info,verdict::requests=off",
        (false, _) => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Another subscriber already set is not an error worth stopping for.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
