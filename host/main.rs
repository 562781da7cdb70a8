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
    /// Acceptance policies: list, check, add, remove, new, replay, bench.
    Policy(verdict::cli::policy::PolicyArgs),
    /// The OpenAI-compatible HTTP server (completions, chat, policy management, metrics).
    Serve(verdict::cli::serve::ServeArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(args) => verdict::cli::policy::run(args),
        Command::Serve(args) => verdict::cli::serve::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole anyhow chain: "what failed: because: root cause".
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
