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
    let result = match cli.command {
        Command::Generate(args) => verdict::cli::generate::run(args),
        Command::Policy(args) => verdict::cli::policy::run(args),
        Command::Serve(args) => verdict::cli::serve::run(args),
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
