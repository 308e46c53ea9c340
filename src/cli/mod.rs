//! The `fastcache` command line. One file per command; this file only dispatches.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod calibrate;
mod demo;
mod inspect;
mod memory_probe;
mod rewrite;
mod run;
mod sampler_args;

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
    /// The whole tool on a bundled model: find the DiT, calibrate, rewrite, sample both, compare.
    Demo(demo::Args),
    /// Describe a model: inputs, outputs, opsets, operators, parameters, external data.
    Inspect(inspect::Args),
    /// Fit each block's skip correction and change scale on seeded sampling runs.
    Calibrate(calibrate::Args),
    /// Measure the uncached model, fewer steps, FastCache and its peers on the same seeds:
    /// speed, skips, memory, PSNR/SSIM, Fréchet distance; JSON, Markdown and PNG figures.
    Bench(bench::Args),
    /// Insert the FastCache block cache into an exported DiT and write the rewritten model.
    Rewrite(rewrite::Args),
    /// Sample a diffusion model (DDIM, DDPM, flow Euler; CFG) on tract or ONNX Runtime and write
    /// the images or latents.
    Run(run::Args),
    /// What `bench` runs in a child process to measure one variant's memory (JSON in and out).
    #[command(hide = true)]
    MemoryProbe(memory_probe::Args),
}

/// Parses the command line and runs the command; errors are printed with their causes and give a
/// non-zero exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Rewrite(args) => rewrite::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Run(args) => run::run(args),
        Command::MemoryProbe(args) => memory_probe::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
