//! The `fastcache` command line. One file per command; this file only dispatches.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod calibrate;
mod demo;
mod inspect;
mod memory_probe;
pub mod output;
mod rewrite;
mod run;
mod sampler_args;
pub mod triton;

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
    /// Write a Triton Inference Server model repository for a rewritten model (onnxruntime
    /// backend with implicit state, or Python backend keeping one state per sequence).
    Triton(triton::Args),
}

/// Parses the command line and runs the command; errors are printed with their causes and give a
/// non-zero exit status.
pub fn main() -> ExitCode {
    ExitCode::from(main_from(std::env::args_os()))
}

/// What [`main`] does with `args` (the program name first) as its command line: the same
/// output and messages; returns the exit status (0; 1 for an error; clap's 2 for a usage
/// error, 0 for --help and --version).
pub fn main_from<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            // As clap's own exit: help and version on stdout, usage errors on stderr.
            let _ = error.print();
            return u8::try_from(error.exit_code()).unwrap_or(2);
        }
    };
    match execute(cli) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("error: {error:#}");
            1
        }
    }
}

/// Runs the command line `args` (the program name first) and returns its error rather than
/// printing it: `{error:#}` is the text the binary prints after `error: `. A usage error (and
/// --help, --version) comes back as an error whose text is clap's message. Inside
/// [`output::capture`] the command's report goes to the capture instead of standard output.
pub fn run_from<I, T>(args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(|error| {
        let text = error.render().to_string();
        let text = text.strip_prefix("error: ").unwrap_or(&text);
        anyhow::anyhow!("{}", text.trim_end())
    })?;
    execute(cli)
}

fn execute(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Rewrite(args) => rewrite::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Run(args) => run::run(args),
        Command::MemoryProbe(args) => memory_probe::run(args),
        Command::Triton(args) => triton::run(args),
    }
}
