//! `fastcache memory-probe` (hidden): what `fastcache bench` runs in a child process to measure
//! one variant's memory on its own. Reads a request as JSON on standard input, prints the result
//! as JSON; see `crate::bench::memory`.

use std::io::Read;

use anyhow::Context;

use crate::bench::memory::{ProbeRequest, probe};

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_: Args) -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("cannot read the request")?;
    let request: ProbeRequest =
        serde_json::from_str(&input).context("the request is not a memory-probe request")?;
    println!("{}", serde_json::to_string(&probe(&request)?)?);
    Ok(())
}
