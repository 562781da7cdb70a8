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
    /// Generate text from a prompt with one model (no speculation); text on stdout.
    Generate(verdict::cli::generate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => verdict::cli::generate::run(args),
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
