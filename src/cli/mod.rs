//! The `fastcache` command line. One file per command; this file only dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod inspect;

#[derive(Parser)]
#[command(
    name = "fastcache",
    version,
    about = "FastCache for diffusion transformers exported to ONNX"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe a model: inputs, outputs, opsets, operators, parameters, external data.
    Inspect(inspect::Args),
}

/// Parses the command line and runs the command; errors are printed with their causes and give a
/// non-zero exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
